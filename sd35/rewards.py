"""Reward functions for RL fine-tuning, and a weighted mix of them chosen by a spec string.

Every reward has the same signature::

    reward(images, prompts, metadata) -> torch.Tensor[B]  (float32, CPU)

- ``images``: float tensor [B, 3, H, W] with values in [0, 1], on any device;
- ``prompts``: list of B strings;
- ``metadata``: list of B dicts (often empty) from the prompt file, e.g. ``{"text": "OPEN"}``.

A spec such as ``"ocr=0.8,pickscore=0.2"`` (the ``--reward`` flag) picks rewards
by name from ``REWARDS`` and weights them. ``RewardMix`` validates the spec
before it loads any model, then returns the weighted total and every term, so
a training loop can log each reward separately.

None of the rewards is differentiable: policy-gradient methods such as
Flow-GRPO only need a number per image.
"""

import base64
import ctypes
import ctypes.util
import http.client
import io
import json
import math
import multiprocessing
import os
import re
import threading
import time
import urllib.error
import urllib.request
from concurrent.futures import ProcessPoolExecutor
from concurrent.futures.process import BrokenProcessPool
from contextlib import contextmanager
from dataclasses import dataclass
from typing import Callable

import torch
from PIL import Image

RewardFn = Callable[[torch.Tensor, list[str], list[dict]], torch.Tensor]


class RewardError(RuntimeError):
    """A reward could not score its batch. The message names the reward and the prompt."""


# --------------------------------------------------------------------------- helpers


def to_pixels(images: torch.Tensor) -> torch.Tensor:
    """A [B, 3, H, W] float tensor in [0, 1] -> uint8 [B, H, W, 3] on the CPU (8 bits per channel,
    height, width, channel: the layout PIL reads as RGB)."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape [B, 3, H, W], got {list(images.shape)}")
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def to_pil(images: torch.Tensor) -> list[Image.Image]:
    """Convert a [B, 3, H, W] float tensor in [0, 1] to B RGB PIL images."""
    return [Image.fromarray(p) for p in to_pixels(images).numpy()]


def levenshtein(a: str, b: str) -> int:
    """Edit distance: the fewest single-character insertions, deletions and substitutions turning a into b."""
    # Dynamic programming over prefixes, keeping one row: previous[j] = distance(a[:i-1], b[:j]).
    previous = list(range(len(b) + 1))
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(
                min(
                    previous[j] + 1,  # delete char_a
                    current[j - 1] + 1,  # insert char_b
                    previous[j - 1] + (char_a != char_b),  # substitute (free if equal)
                )
            )
        previous = current
    return previous[-1]


# --------------------------------------------------------------------------- OCR


def ocr_target(prompt: str, metadata: dict) -> str:
    """The text an image should show: ``metadata["text"]`` if present, else the first "double-quoted" span."""
    if "text" in metadata:
        return str(metadata["text"])
    quoted = re.search(r'"([^"]*)"', prompt)
    if quoted is None:
        raise RewardError(
            f"reward 'ocr': no target text for prompt {prompt!r}; "
            'put the text in double quotes or set metadata["text"]'
        )
    return quoted.group(1)


def normalize_ocr_text(text: str) -> str:
    """Lowercase and drop all whitespace.

    Case and spacing are the least reliable parts of OCR output (and of a
    generated sign), so only the sequence of characters is compared.
    """
    return "".join(text.lower().split())


def ocr_similarity(recognised: str, target: str) -> float:
    """max(0, 1 - edit_distance / len(target)) on normalised strings: 1 for a perfect match, 0 for nothing right."""
    recognised, target = normalize_ocr_text(recognised), normalize_ocr_text(target)
    if not target:
        raise ValueError("the target text is empty after removing whitespace")
    return max(0.0, 1.0 - levenshtein(recognised, target) / len(target))


class OcrReward:
    """How well the text in each image matches the text the prompt asks for, in [0, 1].

    Uses RapidOCR (PP-OCRv4 detection + recognition, the ONNX models ship inside
    the ``rapidocr-onnxruntime`` wheel, so it runs offline on the CPU). All
    recognised lines are concatenated in reading order before comparing.
    """

    def __init__(self, threads: int = 0):
        from rapidocr_onnxruntime import RapidOCR  # imported here: loading ONNX sessions takes a moment

        # threads 0 leaves ONNX Runtime its default (every core); a pool's workers use 1 each.
        self.engine = RapidOCR(**({"intra_op_num_threads": threads} if threads else {}))

    def read_text(self, image: Image.Image) -> str:
        lines, _timings = self.engine(image)  # lines: [[box, text, confidence], ...] or None
        return "".join(text for _box, text, _confidence in lines or [])

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        scores = []
        for image, prompt, meta in zip(to_pil(images), prompts, metadata):
            target = ocr_target(prompt, meta)
            try:
                scores.append(ocr_similarity(self.read_text(image), target))
            except Exception as error:
                raise RewardError(f"reward 'ocr' failed on prompt {prompt!r}: {error}") from error
        return torch.tensor(scores, dtype=torch.float32)


# --------------------------------------------------------------------------- CLIP-based


class ClipCosine:
    """A CLIP-style dual encoder that returns cosine(image embedding, text embedding) per (image, prompt) pair.

    ``model_path`` and ``processor_path`` are hub ids or local folders. Weights
    are read only from safetensors files (never unpickled) and no repository code
    is executed.
    """

    def __init__(self, model_path: str, processor_path: str, device: str | torch.device):
        from transformers import AutoModel, AutoProcessor

        self.device = torch.device(device)
        self.processor = AutoProcessor.from_pretrained(processor_path)
        self.model = AutoModel.from_pretrained(model_path, use_safetensors=True).to(self.device).eval()

    @torch.no_grad()
    def cosine(self, images: torch.Tensor, prompts: list[str]) -> torch.Tensor:
        # The processor does CLIP's own resize, centre crop and normalisation, and truncates
        # prompts to the text encoder's context (77 tokens for CLIP).
        inputs = self.processor(
            text=prompts, images=to_pil(images), padding=True, truncation=True, return_tensors="pt"
        ).to(self.device)
        outputs = self.model(**inputs)
        # text_embeds and image_embeds come out projected and L2-normalised.
        return (outputs.image_embeds * outputs.text_embeds).sum(dim=-1).float().cpu()


class PickScore(ClipCosine):
    """PickScore v1 (CLIP-H fine-tuned on human preferences): logit_scale * cosine / 26.

    logit_scale is about 100, so raw PickScores sit near 20-23; dividing by 26
    (as Flow-GRPO does) brings them to roughly 0.8-0.9.
    """

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        logit_scale = self.model.logit_scale.exp().item()
        return logit_scale * self.cosine(images, prompts) / 26


class ClipScore(ClipCosine):
    """Raw CLIP cosine similarity between image and prompt, in [-1, 1] (typically 0.2-0.4 for a good match).

    The published "CLIPScore" metric is 2.5 * max(cosine, 0) and some papers
    report 100 * cosine; this reward returns the cosine itself.
    """

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        return self.cosine(images, prompts)


# --------------------------------------------------------------------------- JPEG


def jpeg_compressibility(images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
    """Minus the JPEG size (quality 95) in kilobytes (1 kB = 1000 bytes): simpler images score higher.

    A classic toy reward (from DDPO): cheap, needs no model, and easy to hack
    (flat, blurry images win), which makes reward hacking visible quickly.
    """
    sizes_kb = []
    for image in to_pil(images):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95)
        sizes_kb.append(buffer.tell() / 1000)
    return -torch.tensor(sizes_kb, dtype=torch.float32)


# --------------------------------------------------------------------------- remote


class RewardServerError(RuntimeError):
    """The reward server could not be reached or answered something unusable."""


class RemoteReward:
    """Scores from a reward server that speaks JSON over HTTP (e.g. a GenEval server on another machine).

    Request (POST, ``Content-Type: application/json``)::

        {"prompts": [str, ...], "metadata": [dict, ...], "images": [base64 PNG, ...]}

    Expected response: ``{"scores": [float, ...]}`` with one score per image.

    JSON rather than pickle: unpickling a reply would let the server run code here.
    Connection failures, timeouts and 5xx replies are retried ``attempts`` times in
    total, sleeping ``backoff_s``, 2 * ``backoff_s``, 4 * ``backoff_s``, ... in
    between; anything else (4xx, a reply that is not JSON, the wrong number of
    scores) fails at once, since asking again would give the same answer.
    ``timeout_s`` bounds each connect and each read, not the whole request.
    Proxy settings from the environment are ignored: the server is expected on
    the same network (often 127.0.0.1), where a proxy would only get in the way.
    """

    def __init__(
        self,
        url: str,
        timeout_s: float = 120.0,
        attempts: int = 3,
        backoff_s: float = 2.0,
        max_response_bytes: int = 1_000_000,
    ):
        if not str(url).startswith(("http://", "https://")):
            raise ValueError(f"reward server URL {url!r} must start with http:// or https://")
        self.url = url
        self.timeout_s = timeout_s
        self.attempts = attempts
        self.backoff_s = backoff_s
        self.max_response_bytes = max_response_bytes
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))  # {}: no proxies

    def __call__(self, images: torch.Tensor, prompts: list[str], metadata: list[dict]) -> torch.Tensor:
        request_body = json.dumps(
            {"prompts": list(prompts), "metadata": list(metadata), "images": [png_base64(i) for i in to_pil(images)]}
        ).encode("utf-8")
        reply = self._post(request_body)
        try:
            scores = json.loads(reply)["scores"]
        except (ValueError, TypeError, KeyError):
            raise RewardServerError(
                f"reward server {self.url} did not reply with JSON of the form "
                f'{{"scores": [...]}}; the reply starts with {reply[:200]!r}'
            ) from None
        if not isinstance(scores, list) or len(scores) != len(prompts):
            count = len(scores) if isinstance(scores, list) else type(scores).__name__
            raise RewardServerError(
                f"reward server {self.url} returned {count} scores for {len(prompts)} images; "
                f"expected a list of {len(prompts)}"
            )
        if not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
            raise RewardServerError(f"reward server {self.url} returned non-numeric scores: {scores[:8]!r}")
        return torch.tensor(scores, dtype=torch.float32)

    def _post(self, body: bytes) -> bytes:
        """POST ``body`` and return the raw reply, retrying transient failures."""
        last_error = ""
        for attempt in range(self.attempts):
            if attempt > 0:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(
                self.url, data=body, headers={"Content-Type": "application/json"}, method="POST"
            )
            try:
                with self.opener.open(request, timeout=self.timeout_s) as response:
                    # Read one byte past the limit to tell "exactly at the limit" from "too big".
                    reply = response.read(self.max_response_bytes + 1)
            except urllib.error.HTTPError as error:
                if error.code < 500:  # the request itself is wrong; retrying will not help
                    detail = error.read(300).decode("utf-8", "replace")
                    raise RewardServerError(
                        f"reward server {self.url} rejected the request: HTTP {error.code} {detail!r}"
                    ) from None
                last_error = f"HTTP {error.code}"
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as error:
                # urllib wraps connect-time failures in URLError(reason); read timeouts and
                # dropped connections arrive bare.
                reason = getattr(error, "reason", error)
                last_error = f"no answer within {self.timeout_s} s" if isinstance(reason, TimeoutError) else str(reason)
            else:
                if len(reply) > self.max_response_bytes:
                    raise RewardServerError(
                        f"reward server {self.url} sent more than {self.max_response_bytes} bytes; "
                        "expected a small JSON object"
                    )
                return reply
        raise RewardServerError(
            f"reward server {self.url} failed after {self.attempts} attempts (last error: {last_error}); is it running?"
        )


def png_base64(image: Image.Image) -> str:
    """Encode an image as a base64 PNG string (lossless, so the server sees exactly our pixels)."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


# --------------------------------------------------------------------------- registry


@dataclass
class RewardOptions:
    """Settings the reward constructors need; each reward reads only its own."""

    device: str = "cpu"
    remote_url: str | None = None
    remote_timeout_s: float = 120.0
    clip_model: str = "openai/clip-vit-large-patch14"  # also its processor
    pickscore_model: str = "yuvalkirstain/PickScore_v1"
    pickscore_processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # PickScore was fine-tuned from CLIP-H
    threads: int = 0  # threads of a CPU-bound reward's engine; 0 = its library's default


# name -> constructor taking RewardOptions. Constructors may load models, so call them only
# after the spec has been validated.
REWARDS: dict[str, Callable[[RewardOptions], RewardFn]] = {
    "clipscore": lambda o: ClipScore(o.clip_model, o.clip_model, o.device),
    "jpeg_compressibility": lambda o: jpeg_compressibility,
    "ocr": lambda o: OcrReward(o.threads),
    "pickscore": lambda o: PickScore(o.pickscore_model, o.pickscore_processor, o.device),
    "remote": lambda o: RemoteReward(o.remote_url, timeout_s=o.remote_timeout_s),
}


# The range each reward's scores lie in, for the prompt tracker that maps rewards into [0, 1]
# (prompt_allocation.PromptTracker); a reward missing here is tracked by the running min..max
# it shows.
# OCR similarity is in [0, 1]; PickScore already divides by 26 (as Flow-GRPO does: raw scores
# near 20-23 land near 0.8-0.9), so [0, 1] holds it. CLIP cosines (typically 0.2-0.4 of
# [-1, 1]), JPEG sizes and a remote server's scores have no useful fixed range.
REWARD_RANGES: dict[str, tuple[float, float]] = {"ocr": (0.0, 1.0), "pickscore": (0.0, 1.0)}


def reward_range(weights: dict[str, float]) -> tuple[float, float] | None:
    """The range of a weighted mix ``{name: weight}`` (``RewardMix.weights``): the weighted sum
    of its terms' ranges if every term has one (a negative weight swaps a term's ends), else
    None (the tracker then uses a running range)."""
    if any(name not in REWARD_RANGES for name, weight in weights.items() if weight != 0):
        return None
    ends = [sorted((weight * REWARD_RANGES[name][0], weight * REWARD_RANGES[name][1]))
            for name, weight in weights.items() if weight != 0]
    return sum(lo for lo, _ in ends), sum(hi for _, hi in ends)


def parse_reward_spec(spec: str) -> dict[str, float]:
    """Parse ``"name=weight,name=weight"`` (the ``--reward`` flag) into ``{name: weight}``.

    A bare ``name`` has weight 1. Weights may be any finite number. Raises
    ``ValueError`` with a one-line message naming the bad part.
    """
    flag = "--reward"
    expected_names = ", ".join(sorted(REWARDS))
    example = f"e.g. {flag} ocr=0.8,pickscore=0.2"
    if not spec.strip():
        raise ValueError(f"empty {flag}; expected reward names with optional weights, {example}")
    weights: dict[str, float] = {}
    for entry in spec.split(","):
        name, has_weight, weight_text = (part.strip() for part in entry.partition("="))
        if not name:
            raise ValueError(
                f"empty entry in {flag} {spec!r}; expected name or name=weight separated by commas, {example}"
            )
        if name not in REWARDS:
            raise ValueError(f"unknown reward {name!r} in {flag}; expected one of: {expected_names}")
        if name in weights:
            raise ValueError(f"reward {name!r} appears twice in {flag} {spec!r}; give each reward once")
        if not has_weight:
            weights[name] = 1.0
            continue
        if not weight_text:
            raise ValueError(f"missing weight after '{name}=' in {flag}; expected name=number, {example}")
        try:
            weight = float(weight_text)
        except ValueError:
            weight = math.nan
        if not math.isfinite(weight):
            raise ValueError(f"weight {weight_text!r} for reward {name!r} in {flag} is not a finite number; {example}")
        weights[name] = weight
    return weights


# Rewards that spend long on the CPU per image: with `workers`, RewardMix scores them in a
# pool of processes, so that OCR is never the reason a GPU waits. JPEG compressibility is
# CPU-bound too but cheap (under 1 ms a 64 px image here), less than a round trip to a worker:
# measured on the tiny model, pooling it made scoring slower, so it stays in this process,
# as do the model-based rewards, on their device.
CPU_BOUND = ("ocr",)


class RewardMix:
    """A weighted sum of named rewards.

    >>> mix = RewardMix("ocr=0.8,jpeg_compressibility=0.2", workers=4)   # doctest: +SKIP
    >>> total, terms = mix(images, prompts, metadata)                     # doctest: +SKIP
    >>> pending = mix.submit(images, prompts, metadata); ...; pending.result()   # doctest: +SKIP

    ``spec`` is a spec string (see ``parse_reward_spec``). It is validated, and
    so are the options it needs, before any model loads; the models then load
    here, once. With ``workers`` > 0 the CPU-bound rewards (``CPU_BOUND``) run in
    that many worker processes instead, each building its own engine once.
    """

    def __init__(self, spec: str, options: RewardOptions | None = None, workers: int = 0):
        self.weights = parse_reward_spec(spec)
        options = options or RewardOptions()
        # Checked up front: the other rewards may take minutes to load before 'remote' is built.
        if "remote" in self.weights and not options.remote_url:
            raise ValueError("reward 'remote' needs a reward server URL (RewardOptions.remote_url)")
        pooled = [name for name in self.weights if name in CPU_BOUND] if workers > 0 else []
        self.rewards = {name: REWARDS[name](options) for name in self.weights if name not in pooled}
        self.workers, self.pool = workers, None
        if pooled:
            # "spawn", not fork: forking a process whose torch (and ONNX) thread pools are
            # running can deadlock the child. Each worker imports the rewards afresh.
            self.pool = ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"),
                                            initializer=_start_worker, initargs=(pooled,))
        self.pooled = pooled

    def __call__(
        self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        """Return ``(total [B], {name: term [B]})`` with total = sum of weight * term, all float32 on the CPU."""
        return self.submit(images, prompts, metadata).result()

    def submit(self, images: torch.Tensor, prompts: list[str], metadata: list[dict] | None = None,
               total_only: bool = False) -> "PendingScores":
        """Start scoring and return at once; ``.result()`` waits for ``(total, terms)``, or for
        the total alone with ``total_only``. The pooled rewards run in the workers meanwhile;
        the others are scored here, now."""
        batch_size = len(prompts)
        metadata = [{} for _ in prompts] if metadata is None else list(metadata)
        if images.shape[0] != batch_size or len(metadata) != batch_size:
            raise ValueError(
                f"got {images.shape[0]} images, {batch_size} prompts and {len(metadata)} metadata dicts; "
                "expected equal counts"
            )
        where = f"on prompt {prompts[0]!r}" + (f" (first of {batch_size})" if batch_size > 1 else "")
        terms: dict[str, torch.Tensor | list] = {}
        if self.pooled:
            # Images reach the workers as raw bytes: uint8 pixels (to_pixels, as to_pil makes
            # them here), with their shape; scores come back as lists of floats. (The executor
            # moves them through a pipe between our own processes; nothing is read from a file
            # or the network, so the no-pickle rule for loaded data is not at stake.)
            # One image a task: OCR time varies between images (each line found adds a
            # recognition pass), and small tasks keep every worker busy to the end of the batch.
            # Measured on 2 workers, they cost nothing against one chunk a worker (22.6 against
            # 22.8 images/s).
            pixels = to_pixels(images)
            chunks = torch.arange(batch_size).split(1)
            for name in self.pooled:
                terms[name] = [(c, self.pool.submit(_score_in_worker, name, pixels[c].numpy().tobytes(),
                                                    tuple(pixels[c].shape), [prompts[i] for i in c.tolist()],
                                                    [metadata[i] for i in c.tolist()])) for c in chunks]
        for name, reward in self.rewards.items():
            terms[name] = _checked(name, _score(name, reward, images, prompts, metadata, where), batch_size, where)
        return PendingScores(self, terms, prompts, where, total_only)

    @contextmanager
    def leave_cores_to_workers(self):
        """While the workers score, torch in this process keeps the cores they leave (at
        least one thread). On a CPU run its threads and the workers would otherwise share
        the same cores, and a parallel region waits for its slowest thread, often the one a
        worker took the core from: on the tiny model with 2 OCR workers on 2 cores, Stepwise's
        scoring took 50.6 s an iteration at torch's 2 threads, 41.3 s at 1. On a GPU this
        process's threads mostly wait for the device, and giving up cores costs nothing."""
        before = torch.get_num_threads()
        torch.set_num_threads(max(1, before - self.workers) if self.pool else before)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def close(self):
        """Stop the worker processes (also done at interpreter exit)."""
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


class PendingScores:
    """Scores still being computed by RewardMix's workers; ``result()`` waits for them."""

    def __init__(self, mix, terms, prompts, where, total_only):
        self.mix, self.terms, self.prompts, self.where, self.total_only = mix, terms, prompts, where, total_only

    def result(self):
        terms = {}
        for name, term in self.terms.items():
            if isinstance(term, torch.Tensor):
                terms[name] = term
                continue
            scores = torch.empty(len(self.prompts))
            for rows, future in term:
                try:
                    scores[rows] = torch.tensor(future.result(), dtype=torch.float32)
                except BrokenProcessPool as error:
                    # A worker died (killed, out of memory, a crash in native code): the pool
                    # is unusable and the run has to stop, naming where it was.
                    raise RewardError(f"reward {name!r} failed on prompt {self.prompts[int(rows[0])]!r}: a scoring "
                                      f"worker process died ({error or 'no message'})") from error
            terms[name] = _checked(name, scores, len(self.prompts), self.where)
        total = sum(self.mix.weights[name] * terms[name] for name in terms)
        return total if self.total_only else (total, terms)


def _score(name, reward, images, prompts, metadata, where):
    try:
        return reward(images, prompts, metadata)
    except RewardError:
        raise  # already names the reward and the prompt
    except RewardServerError as error:  # the server's fault, not any one prompt's
        raise RewardError(f"reward {name!r} failed {where}: {error}") from error
    except Exception as error:
        raise _blame(name, reward, images, prompts, metadata, error) from error


def _checked(name, scores, batch_size, where):
    scores = scores.detach().float().cpu()
    if scores.shape != (batch_size,):
        raise RewardError(f"reward {name!r} returned shape {list(scores.shape)} {where}; expected [{batch_size}]")
    return scores  # non-finite scores pass through: the trainer drops those samples and counts them


def _blame(name, reward, images, prompts, metadata, error):
    """A RewardError naming the prompt the reward fails on: the batch is scored again one
    image at a time (only on failure, so the cost is paid only then)."""
    for i, prompt in enumerate(prompts):
        try:
            reward(images[i:i + 1], prompts[i:i + 1], metadata[i:i + 1])
        except Exception as single:
            return RewardError(f"reward {name!r} failed on prompt {prompt!r}: {single}")
    return RewardError(f"reward {name!r} failed on a batch of {len(prompts)} starting with prompt "
                       f"{prompts[0]!r}, though not on any one image alone: {error}")


# The worker processes' side. Each builds its CPU-bound rewards once, single-threaded (the
# pool, not the engine, spreads the work over the cores).
_worker_rewards = {}


def _start_worker(names):
    # A worker blocks on its task queue; if the trainer is killed outright (SIGKILL, OOM
    # killer) nothing tells it, so it watches for being orphaned and exits then.
    parent = os.getppid()

    def exit_when_orphaned():
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=exit_when_orphaned, daemon=True).start()
    _worker_rewards.update(worker_rewards(names))


def worker_rewards(names):
    """Set this process up as a scoring worker (one torch thread, freed memory kept) and build
    the rewards `names` with single-threaded engines -> {name: reward}."""
    torch.set_num_threads(1)
    keep_freed_memory()
    return {name: REWARDS[name](RewardOptions(threads=1)) for name in names}


def keep_freed_memory():
    """Make glibc keep large freed blocks in this process for reuse.

    RapidOCR turns ONNX Runtime's memory arena off, so every detection allocates its feature
    maps afresh, some of them over 64 MB at the detector's 736 px input (a 64 MB threshold
    did not help, 256 MB did). glibc serves blocks that large from new pages, which the
    kernel zero-fills and then takes back at free: 28% of an OCR call here (0.094 against
    0.068 s an image, single-threaded, 60 images of 64 px). With these thresholds the
    freed blocks stay in the heap for the next image. The peak memory is unchanged (a worker
    holds those blocks during every detection anyway); only the idle worker keeps them.
    Elsewhere than glibc there is no mallopt, and this does nothing."""
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h> parameter numbers
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt(m_mmap_threshold, 256 << 20)  # blocks up to 256 MB come from the heap
        libc.mallopt(m_trim_threshold, 1 << 30)  # and the heap shrinks only beyond 1 GB free
    except (OSError, AttributeError, TypeError):
        pass


def _score_in_worker(name, pixels, shape, prompts, metadata):
    images = torch.frombuffer(bytearray(pixels), dtype=torch.uint8).reshape(shape).permute(0, 3, 1, 2).float() / 255
    where = f"on prompt {prompts[0]!r}" + (f" (first of {len(prompts)})" if len(prompts) > 1 else "")
    return _checked(name, _score(name, _worker_rewards[name], images, prompts, metadata, where), len(prompts), where).tolist()
