"""Rewards for RL fine-tuning, and a weighted mix of them chosen by a spec string.

Every reward is `reward(images, prompts, metadata) -> float32 tensor [B] on the CPU`, with
images [B, 3, H, W] in [0, 1] on any device, B prompt strings and B metadata dicts from the
prompt file (e.g. {"text": "OPEN"}). `--reward=ocr=0.8,pickscore=0.2` picks rewards from
REWARDS by name and weights them; RewardMix checks the spec before any model loads and
returns the weighted total with every term, so each can be logged. None is differentiable:
policy-gradient methods need one number per image.
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


def to_pixels(images):
    """[B, 3, H, W] floats in [0, 1] -> uint8 [B, H, W, 3] on the CPU, the layout PIL reads as RGB."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape [B, 3, H, W], got {list(images.shape)}")
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def to_pil(images):
    return [Image.fromarray(p) for p in to_pixels(images).numpy()]


def levenshtein(a, b):
    """Edit distance: the fewest single-character insertions, deletions and substitutions turning a into b."""
    previous = list(range(len(b) + 1))  # previous[j] = distance(a[:i-1], b[:j])
    for i, char_a in enumerate(a, start=1):
        current = [i]
        for j, char_b in enumerate(b, start=1):
            current.append(min(previous[j] + 1, current[j - 1] + 1, previous[j - 1] + (char_a != char_b)))
        previous = current
    return previous[-1]


def ocr_target(prompt, metadata):
    """The text an image should show: metadata["text"] if present, else the first "double-quoted" span."""
    if "text" in metadata:
        return str(metadata["text"])
    quoted = re.search(r'"([^"]*)"', prompt)
    if quoted is None:
        raise RewardError(f"reward 'ocr': no target text for prompt {prompt!r}; "
                          'put the text in double quotes or set metadata["text"]')
    return quoted.group(1)


def ocr_similarity(recognised, target):
    """max(0, 1 - edit_distance / len(target)) on the strings lowercased without whitespace (case
    and spacing are the least reliable parts of OCR output): 1 for a perfect match."""
    recognised, target = ("".join(text.lower().split()) for text in (recognised, target))
    if not target:
        raise ValueError("the target text is empty after removing whitespace")
    return max(0.0, 1.0 - levenshtein(recognised, target) / len(target))


class OcrReward:
    """How well the text in each image matches the text the prompt asks for, in [0, 1]: RapidOCR
    (PP-OCR detection and recognition, ONNX models inside its wheel, offline on the CPU) reads
    every line in reading order."""

    def __init__(self, threads=0):
        from rapidocr_onnxruntime import RapidOCR  # here: building the ONNX sessions takes a moment
        self.engine = RapidOCR(**({"intra_op_num_threads": threads} if threads else {}))  # 0: every core

    def read_text(self, image):
        lines, _timings = self.engine(image)  # [[box, text, confidence], ...] or None
        return "".join(text for _box, text, _confidence in lines or [])

    def __call__(self, images, prompts, metadata):
        scores = []
        for image, prompt, meta in zip(to_pil(images), prompts, metadata):
            target = ocr_target(prompt, meta)
            try:
                scores.append(ocr_similarity(self.read_text(image), target))
            except Exception as error:
                raise RewardError(f"reward 'ocr' failed on prompt {prompt!r}: {error}") from error
        return torch.tensor(scores, dtype=torch.float32)


class ClipCosine:
    """cosine(image embedding, text embedding) of a CLIP-style dual encoder, per (image, prompt)
    pair; weights only from safetensors, no repository code run."""

    def __init__(self, model_path, processor_path, device):
        from transformers import AutoModel, AutoProcessor
        self.device = torch.device(device)
        self.processor = AutoProcessor.from_pretrained(processor_path)
        self.model = AutoModel.from_pretrained(model_path, use_safetensors=True).to(self.device).eval()

    @torch.no_grad()
    def cosine(self, images, prompts):
        # The processor does CLIP's resize, crop and normalisation and truncates prompts to its context.
        inputs = self.processor(text=prompts, images=to_pil(images), padding=True, truncation=True,
                                return_tensors="pt").to(self.device)
        outputs = self.model(**inputs)  # embeddings come out projected and L2-normalised
        return (outputs.image_embeds * outputs.text_embeds).sum(dim=-1).float().cpu()


class PickScore(ClipCosine):
    """PickScore v1 (CLIP-H tuned on human preferences): logit_scale * cosine / 26, as Flow-GRPO scales it."""

    def __call__(self, images, prompts, metadata):
        return self.model.logit_scale.exp().item() * self.cosine(images, prompts) / 26


class ClipScore(ClipCosine):
    """The CLIP cosine itself, in [-1, 1] (not the 2.5 * max(cos, 0) of the CLIPScore metric)."""

    def __call__(self, images, prompts, metadata):
        return self.cosine(images, prompts)


def jpeg_compressibility(images, prompts, metadata):
    """Minus the JPEG size (quality 95) in kB: DDPO's toy reward, cheap and easy to hack (flat
    images win), so reward hacking shows quickly."""
    sizes = []
    for image in to_pil(images):
        buffer = io.BytesIO()
        image.save(buffer, format="JPEG", quality=95)
        sizes.append(buffer.tell() / 1000)
    return -torch.tensor(sizes, dtype=torch.float32)


class RewardServerError(RuntimeError):
    """The reward server could not be reached or answered something unusable."""


class RemoteReward:
    """Scores from a server speaking JSON over HTTP (e.g. a GenEval server elsewhere).

    POST {"prompts": [...], "metadata": [...], "images": [base64 PNG, ...]}, expect
    {"scores": [float, ...]}, one per image. JSON, not pickle: unpickling a reply would let the
    server run code here. Connection failures, timeouts and 5xx replies are retried `attempts`
    times in all with doubling sleeps from `backoff_s`; anything else fails at once, since
    asking again gives the same answer. `timeout_s` bounds each connect and read. Proxies are
    ignored: the server is expected on the same network, where a proxy only gets in the way.
    """

    def __init__(self, url, timeout_s=120.0, attempts=3, backoff_s=2.0, max_response_bytes=1_000_000):
        if not str(url).startswith(("http://", "https://")):
            raise ValueError(f"reward server URL {url!r} must start with http:// or https://")
        self.url, self.timeout_s, self.attempts, self.backoff_s = url, timeout_s, attempts, backoff_s
        self.max_response_bytes = max_response_bytes
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def __call__(self, images, prompts, metadata):
        body = json.dumps({"prompts": list(prompts), "metadata": list(metadata),
                           "images": [png_base64(i) for i in to_pil(images)]}).encode()
        reply = self._post(body)
        try:
            scores = json.loads(reply)["scores"]
        except (ValueError, TypeError, KeyError):
            raise RewardServerError(f'reward server {self.url} did not reply with JSON of the form {{"scores": [...]}}; '
                                    f"the reply starts with {reply[:200]!r}") from None
        if not isinstance(scores, list) or len(scores) != len(prompts):
            count = len(scores) if isinstance(scores, list) else type(scores).__name__
            raise RewardServerError(f"reward server {self.url} returned {count} scores for {len(prompts)} images; "
                                    f"expected a list of {len(prompts)}")
        if not all(isinstance(s, (int, float)) and not isinstance(s, bool) for s in scores):
            raise RewardServerError(f"reward server {self.url} returned non-numeric scores: {scores[:8]!r}")
        return torch.tensor(scores, dtype=torch.float32)

    def _post(self, body):
        last_error = ""
        for attempt in range(self.attempts):
            if attempt > 0:
                time.sleep(self.backoff_s * 2 ** (attempt - 1))
            request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
            try:
                with self.opener.open(request, timeout=self.timeout_s) as response:
                    reply = response.read(self.max_response_bytes + 1)  # one past: "too big" shows
            except urllib.error.HTTPError as error:
                if error.code < 500:  # the request itself is wrong
                    raise RewardServerError(f"reward server {self.url} rejected the request: HTTP {error.code} "
                                            f"{error.read(300).decode('utf-8', 'replace')!r}") from None
                last_error = f"HTTP {error.code}"
            except (urllib.error.URLError, http.client.HTTPException, ConnectionError, TimeoutError) as error:
                reason = getattr(error, "reason", error)  # URLError wraps connect-time failures
                last_error = f"no answer within {self.timeout_s} s" if isinstance(reason, TimeoutError) else str(reason)
            else:
                if len(reply) > self.max_response_bytes:
                    raise RewardServerError(f"reward server {self.url} sent more than {self.max_response_bytes} "
                                            "bytes; expected a small JSON object")
                return reply
        raise RewardServerError(f"reward server {self.url} failed after {self.attempts} attempts "
                                f"(last error: {last_error}); is it running?")


def png_base64(image):
    """A lossless PNG in base64, so the server sees exactly our pixels."""
    buffer = io.BytesIO()
    image.save(buffer, format="PNG")
    return base64.b64encode(buffer.getvalue()).decode("ascii")


@dataclass
class RewardOptions:
    """What the reward constructors need; each reads only its own."""
    device: str = "cpu"
    remote_url: str | None = None
    remote_timeout_s: float = 120.0
    clip_model: str = "openai/clip-vit-large-patch14"  # also its processor
    pickscore_model: str = "yuvalkirstain/PickScore_v1"
    pickscore_processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # PickScore was tuned from CLIP-H
    threads: int = 0  # threads of a CPU-bound reward's engine; 0 = its library's default


# name -> constructor; constructors may load models, so call them only once the spec is checked.
REWARDS: dict[str, Callable[[RewardOptions], RewardFn]] = {
    "clipscore": lambda o: ClipScore(o.clip_model, o.clip_model, o.device),
    "jpeg_compressibility": lambda o: jpeg_compressibility,
    "ocr": lambda o: OcrReward(o.threads),
    "pickscore": lambda o: PickScore(o.pickscore_model, o.pickscore_processor, o.device),
    "remote": lambda o: RemoteReward(o.remote_url, timeout_s=o.remote_timeout_s),
}

# The range of each reward's scores, for the prompt tracker that maps rewards into [0, 1]; a
# reward missing here (CLIP cosines, JPEG sizes, a server's scores) is tracked by the running
# min..max it shows.
REWARD_RANGES: dict[str, tuple[float, float]] = {"ocr": (0.0, 1.0), "pickscore": (0.0, 1.0)}


def reward_range(weights):
    """The range of a mix {name: weight}: the weighted sum of its terms' ranges (a negative weight
    swaps a term's ends), or None if a weighted term has none."""
    terms = [(name, weight) for name, weight in weights.items() if weight != 0]
    if any(name not in REWARD_RANGES for name, _ in terms):
        return None
    ends = [sorted((weight * REWARD_RANGES[name][0], weight * REWARD_RANGES[name][1])) for name, weight in terms]
    return sum(lo for lo, _ in ends), sum(hi for _, hi in ends)


def parse_reward_spec(spec):
    """"name=weight,name" (--reward) -> {name: weight}; a bare name weighs 1. A ValueError of
    one line names the bad part."""
    example = "e.g. --reward ocr=0.8,pickscore=0.2"
    if not spec.strip():
        raise ValueError(f"empty --reward; expected reward names with optional weights, {example}")
    weights = {}
    for entry in spec.split(","):
        name, has_weight, weight_text = (part.strip() for part in entry.partition("="))
        if not name:
            raise ValueError(f"empty entry in --reward {spec!r}; expected name or name=weight separated by commas, "
                             f"{example}")
        if name not in REWARDS:
            raise ValueError(f"unknown reward {name!r} in --reward; expected one of: {', '.join(sorted(REWARDS))}")
        if name in weights:
            raise ValueError(f"reward {name!r} appears twice in --reward {spec!r}; give each reward once")
        if has_weight and not weight_text:
            raise ValueError(f"missing weight after '{name}=' in --reward; expected name=number, {example}")
        try:
            weights[name] = float(weight_text) if has_weight else 1.0
        except ValueError:
            weights[name] = math.nan
        if not math.isfinite(weights[name]):
            raise ValueError(f"weight {weight_text!r} for reward {name!r} in --reward is not a finite number; {example}")
    return weights


# Rewards that spend long on the CPU per image: with workers, RewardMix scores them in a pool
# of processes so that OCR never keeps the accelerator waiting. JPEG is CPU-bound too but
# cheaper than a round trip to a worker, so it stays here with the model-based rewards.
CPU_BOUND = ("ocr",)


class RewardMix:
    """A weighted sum of named rewards: `mix(images, prompts, metadata) -> (total, {name: term})`,
    or `mix.submit(...)` returning at once, `.result()` later. The spec and the options it needs
    are checked before any model loads; with `workers` > 0 the CPU_BOUND rewards run in that
    many worker processes, each building its engine once."""

    def __init__(self, spec, options=None, workers=0):
        self.weights = parse_reward_spec(spec)
        options = options or RewardOptions()
        if "remote" in self.weights and not options.remote_url:  # before the others take minutes to load
            raise ValueError("reward 'remote' needs a reward server URL (RewardOptions.remote_url)")
        self.pooled = [name for name in self.weights if name in CPU_BOUND] if workers > 0 else []
        self.rewards = {name: REWARDS[name](options) for name in self.weights if name not in self.pooled}
        self.workers, self.pool = workers, None
        if self.pooled:  # spawn, not fork: forking while torch's and ONNX's thread pools run can deadlock
            self.pool = ProcessPoolExecutor(workers, multiprocessing.get_context("spawn"),
                                            initializer=_start_worker, initargs=(self.pooled,))

    def __call__(self, images, prompts, metadata=None):
        return self.submit(images, prompts, metadata).result()

    def submit(self, images, prompts, metadata=None, total_only=False):
        """Start scoring: the pooled rewards run in the workers meanwhile, the others here, now.
        `.result()` gives (total [B], {name: term [B]}), or the total alone with total_only."""
        n = len(prompts)
        metadata = [{} for _ in prompts] if metadata is None else list(metadata)
        if images.shape[0] != n or len(metadata) != n:
            raise ValueError(f"got {images.shape[0]} images, {n} prompts and {len(metadata)} metadata dicts; "
                             "expected equal counts")
        where = f"on prompt {prompts[0]!r}" + (f" (first of {n})" if n > 1 else "")
        terms = {}
        if self.pooled:
            # Raw uint8 bytes through the executor's pipe between our own processes (nothing read
            # from a file or the network). One image a task: OCR time varies between images, and
            # small tasks keep every worker busy to the end of the batch.
            pixels = to_pixels(images)
            for name in self.pooled:
                terms[name] = [(i, self.pool.submit(_score_in_worker, name, pixels[i:i + 1].numpy().tobytes(),
                                                    tuple(pixels[i:i + 1].shape), prompts[i:i + 1], metadata[i:i + 1]))
                               for i in range(n)]
        for name, reward in self.rewards.items():
            terms[name] = _checked(name, _score(name, reward, images, prompts, metadata, where), n, where)
        return PendingScores(self, terms, prompts, where, total_only)

    @contextmanager
    def leave_cores_to_workers(self):
        """While the workers score, torch here keeps only the cores they leave (at least one): a
        parallel region waits for its slowest thread, often the one whose core a worker took. On
        a GPU this process mostly waits for the device, and giving up cores costs nothing."""
        before = torch.get_num_threads()
        torch.set_num_threads(max(1, before - self.workers) if self.pool else before)
        try:
            yield
        finally:
            torch.set_num_threads(before)

    def close(self):
        if self.pool is not None:
            self.pool.shutdown(wait=True, cancel_futures=True)


class PendingScores:
    """Scores still being computed by RewardMix's workers; `result()` waits for them."""

    def __init__(self, mix, terms, prompts, where, total_only):
        self.mix, self.terms, self.prompts, self.where, self.total_only = mix, terms, prompts, where, total_only

    def result(self):
        terms = {}
        for name, term in self.terms.items():
            if not isinstance(term, torch.Tensor):
                scores = torch.empty(len(self.prompts))
                for i, future in term:
                    try:
                        scores[i] = future.result()[0]
                    except BrokenProcessPool as error:  # a worker died: the pool is unusable
                        raise RewardError(f"reward {name!r} failed on prompt {self.prompts[i]!r}: a scoring worker "
                                          f"process died ({error or 'no message'})") from error
                term = _checked(name, scores, len(self.prompts), self.where)
            terms[name] = term
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


def _checked(name, scores, n, where):
    scores = scores.detach().float().cpu()
    if scores.shape != (n,):
        raise RewardError(f"reward {name!r} returned shape {list(scores.shape)} {where}; expected [{n}]")
    return scores  # non-finite scores pass: the trainer drops those samples and counts them


def _blame(name, reward, images, prompts, metadata, error):
    """A RewardError naming the prompt the reward fails on, found by scoring one image at a time
    (only on failure)."""
    for i, prompt in enumerate(prompts):
        try:
            reward(images[i:i + 1], prompts[i:i + 1], metadata[i:i + 1])
        except Exception as single:
            return RewardError(f"reward {name!r} failed on prompt {prompt!r}: {single}")
    return RewardError(f"reward {name!r} failed on a batch of {len(prompts)} starting with prompt "
                       f"{prompts[0]!r}, though not on any one image alone: {error}")


_worker_rewards = {}


def _start_worker(names):
    # Nothing tells a worker blocked on its queue that the trainer was SIGKILLed: it watches
    # for being orphaned and exits then.
    parent = os.getppid()

    def exit_when_orphaned():
        while os.getppid() == parent:
            time.sleep(1)
        os._exit(1)

    threading.Thread(target=exit_when_orphaned, daemon=True).start()
    _worker_rewards.update(worker_rewards(names))


def worker_rewards(names):
    """Set this process up as a scoring worker (one torch thread, freed memory kept) and build
    the rewards `names` single-threaded (the pool spreads the work) -> {name: reward}."""
    torch.set_num_threads(1)
    keep_freed_memory()
    return {name: REWARDS[name](RewardOptions(threads=1)) for name in names}


def keep_freed_memory():
    """Make glibc keep large freed blocks for reuse. RapidOCR turns ONNX Runtime's arena off, so
    each detection allocates its large feature maps afresh; glibc serves blocks that large from
    new pages, which the kernel zero-fills and takes back at free, a large share of an OCR
    call. The peak memory is unchanged; only an idle worker keeps the blocks. Without glibc
    there is no mallopt and this does nothing."""
    m_trim_threshold, m_mmap_threshold = -1, -3  # glibc's <malloc.h> parameter numbers
    try:
        libc = ctypes.CDLL(ctypes.util.find_library("c"))
        libc.mallopt(m_mmap_threshold, 256 << 20)  # large enough for the detector's feature maps
        libc.mallopt(m_trim_threshold, 1 << 30)
    except (OSError, AttributeError, TypeError):
        pass


def _score_in_worker(name, pixels, shape, prompts, metadata):
    images = torch.frombuffer(bytearray(pixels), dtype=torch.uint8).reshape(shape).permute(0, 3, 1, 2).float() / 255
    where = f"on prompt {prompts[0]!r}"
    return _checked(name, _score(name, _worker_rewards[name], images, prompts, metadata, where), len(prompts),
                    where).tolist()
