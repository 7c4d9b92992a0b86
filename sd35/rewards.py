"""Rewards for RL fine-tuning, and a weighted mix of them chosen by a spec string.

Every reward is `reward(images, prompts, metadata) -> float32 tensor [B] on the CPU`, with images
[B, 3, H, W] in [0, 1] on any device and B prompts and metadata dicts from the prompt file (e.g.
{"text": "OPEN"}); one made of parts may return (total [B], {part: [B]}), each part logged as
name_part. `--reward=ocr=0.8,pickscore=0.2` weights rewards of REWARDS by name; RewardMix returns
the weighted total with every term, so each can be logged. None need be differentiable.
"""
import base64
import http.client
import importlib
import json
import math
import time
import urllib.error
import urllib.request
from contextlib import contextmanager
from dataclasses import dataclass
from types import SimpleNamespace

import torch
from PIL import Image

from sd35 import pixel_rewards
from sd35.pixel_rewards import encoded
from sd35.workers import ScoringWorkers, WorkerError


class RewardError(RuntimeError):
    """A reward could not score its batch. The message names the reward and the prompt."""


def to_pixels(images):
    """[B, 3, H, W] floats in [0, 1] -> uint8 [B, H, W, 3] on the CPU, the layout PIL reads as RGB."""
    if images.ndim != 4 or images.shape[1] != 3:
        raise ValueError(f"expected images of shape [B, 3, H, W], got {list(images.shape)}")
    return (images.detach().float().clamp(0, 1) * 255).round().to(torch.uint8).permute(0, 2, 3, 1).cpu()


def to_pil(images):
    return [Image.fromarray(p) for p in to_pixels(images).numpy()]


def on_pixels(reward):
    """A reward of sd35/pixel_rewards.py (uint8 pixels in, floats out) as a reward of images."""
    return lambda images, prompts, metadata: torch.tensor(reward(to_pixels(images).numpy(), prompts, metadata),
                                                          dtype=torch.float32)


class ClipCosine:
    """cosine(image embedding, text embedding) of a CLIP-style dual encoder per (image, prompt)
    pair: clipscore is the cosine itself, in [-1, 1] (not the CLIPScore metric's 2.5 max(cos, 0));
    pickscore is PickScore v1 (CLIP-H tuned on human preferences) as Flow-GRPO scales it,
    logit_scale x cosine / 26. Weights only from safetensors, no repository code run."""

    def __init__(self, model_path, processor_path, device, pickscore=False):
        from transformers import AutoModel, AutoProcessor
        self.device, self.pickscore = torch.device(device), pickscore
        self.processor = AutoProcessor.from_pretrained(processor_path)
        self.model = AutoModel.from_pretrained(model_path, use_safetensors=True).to(self.device).eval()

    @torch.no_grad()
    def __call__(self, images, prompts, metadata):
        # The processor does CLIP's resize, crop and normalisation and truncates prompts to its context.
        inputs = self.processor(text=prompts, images=to_pil(images), padding=True, truncation=True,
                                return_tensors="pt").to(self.device)
        outputs = self.model(**inputs)  # embeddings come out projected and L2-normalised
        scale = self.model.logit_scale.exp().item() / 26 if self.pickscore else 1.0
        return scale * (outputs.image_embeds * outputs.text_embeds).sum(dim=-1).float().cpu()


class RewardServerError(RuntimeError):
    """The reward server could not be reached or answered something unusable."""


class RemoteReward:
    """Scores from a server (e.g. GenEval's elsewhere): POST {"prompts", "metadata", "images": [base64
    PNG]}, expect {"scores": [float, ...]}. JSON, not pickle, which would let the server run code
    here. Connection failures, timeouts and 5xx replies are tried `attempts` times in all, with
    doubling sleeps from `backoff_s`; anything else fails at once, since asking again gives the same
    answer. Proxies are ignored: the server is expected on the same network."""

    def __init__(self, url, timeout_s=120.0, attempts=3, backoff_s=2.0, max_response_bytes=1_000_000):
        if not str(url).startswith(("http://", "https://")):
            raise ValueError(f"reward server URL {url!r} must start with http:// or https://")
        self.url, self.timeout_s, self.attempts, self.backoff_s = url, timeout_s, attempts, backoff_s
        self.max_response_bytes = max_response_bytes
        self.opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))

    def __call__(self, images, prompts, metadata):
        body = json.dumps({"prompts": list(prompts), "metadata": list(metadata),
                           "images": [base64.b64encode(encoded(i, format="PNG")).decode("ascii")
                                      for i in to_pil(images)]}).encode()  # lossless: the server sees our pixels
        reply = self._post(body)
        try:
            scores = json.loads(reply)["scores"]
        except (ValueError, TypeError, KeyError):
            raise RewardServerError(f"reward server {self.url} did not reply with JSON of the form "
                                    f'{{"scores": [...]}}; the reply starts with {reply[:200]!r}') from None
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


@dataclass
class RewardOptions:
    """What the reward constructors need; each reads only its own."""
    device: str = "cpu"
    remote_url: str | None = None
    remote_timeout: float = 120.0  # seconds, per try
    clip_model: str = "openai/clip-vit-large-patch14"  # also its processor
    pickscore_model: str = "yuvalkirstain/PickScore_v1"
    pickscore_processor: str = "laion/CLIP-ViT-H-14-laion2B-s32B-b79K"  # PickScore was tuned from CLIP-H
    threads: int = 0  # threads of a CPU-bound reward's engine; 0 = its library's default
    remote_range: tuple | None = None  # the server's scores' (lo, hi), if known


# Parameters of the models that rewards keep on the device, in float32 (as from_pretrained loads
# them): CLIP ViT-L/14, and the CLIP ViT-H/14 that PickScore tuned, counted on their architectures.
REWARD_MODEL_PARAMETERS = {"clipscore": 427_616_513, "pickscore": 986_109_441}

# name -> constructor; constructors may load models, so call them only once the spec is checked.
REWARDS = {
    "clipscore": lambda o: ClipCosine(o.clip_model, o.clip_model, o.device),
    "jpeg_compressibility": lambda o: on_pixels(pixel_rewards.jpeg_compressibility),
    "ocr": lambda o: on_pixels(pixel_rewards.OcrReward(o.threads)),
    "pickscore": lambda o: ClipCosine(o.pickscore_model, o.pickscore_processor, o.device, pickscore=True),
    "remote": lambda o: RemoteReward(o.remote_url, o.remote_timeout),
    "shapes": lambda o: importlib.import_module("sd35.shapes").reward,  # colour, place and shape of one object
}

# The range that the real model's scores fill, for the prompt tracker, which maps each reward
# into [0, 1] by it: too wide a range and every prompt looks alike to it. JPEG sizes (which
# depend on the resolution) and a server's scores (unless declared) have none: the tracker
# follows the running min..max they show.
REWARD_RANGES = {
    "ocr": (0.0, 1.0),  # a similarity, by construction
    "shapes": (0.0, 1.0),  # a product of three shares
    # PickScore as Flow-GRPO scales it (100 cos / 26): SD3.5-M's images score about 0.9 on their
    # prompts (Stepwise-Flow-GRPO, arXiv:2603.28718, fig. 1), and RL moves that by hundredths.
    "pickscore": (0.7, 1.0),
    # CLIP ViT-L/14 cosines of images and their captions: CLIPScore's rescaling, 2.5 max(cos, 0),
    # maps them into [0, 1] (Hessel et al., EMNLP 2021), so they lie within [0, 0.4].
    "clipscore": (0.0, 0.4),
}


def parse_range(text):
    """"lo,hi" (--remote_range) -> (lo, hi), "" -> None; a ValueError unless both are finite and lo < hi."""
    if not text:
        return None
    lo, hi = (float(end) for end in text.split(","))
    if not (math.isfinite(lo) and math.isfinite(hi) and lo < hi):
        raise ValueError(f"{text!r} is not lo,hi with finite lo < hi")
    return lo, hi


def reward_range(weights, remote_range=None):
    """The range of a mix {name: weight}: the weighted sum of its terms' ranges (a negative weight
    swaps a term's ends), or None if a weighted term has none."""
    ranges = {**REWARD_RANGES, **({"remote": remote_range} if remote_range else {})}
    terms = [(name, weight) for name, weight in weights.items() if weight != 0]
    if any(name not in ranges for name, _ in terms):
        return None
    ends = [sorted((weight * ranges[name][0], weight * ranges[name][1])) for name, weight in terms]
    return sum(lo for lo, _ in ends), sum(hi for _, hi in ends)


def parse_reward_spec(spec):
    """"name=weight,name" (--reward) -> {name: weight}; a bare name weighs 1. A ValueError of one line
    names the bad part."""
    example = "e.g. --reward ocr=0.8,pickscore=0.2"
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
        try:
            weights[name] = float(weight_text) if has_weight else 1.0
        except ValueError:
            weights[name] = math.nan
        if not math.isfinite(weights[name]):
            raise ValueError(f"weight {weight_text!r} for reward {name!r} in --reward is not a finite number; "
                             f"{example}")
    return weights


# Rewards that spend long on the CPU per image: with workers, RewardMix scores them in worker
# processes so that OCR never keeps the accelerator waiting. JPEG is cheaper than a round trip.
# Each must be one of pixel_rewards.PIXEL_REWARDS, which the workers can build.
CPU_BOUND = ("ocr",)


class RewardMix:
    """A weighted sum of named rewards: `mix(images, prompts, metadata) -> (total, {name: term})`, or
    `mix.submit(...)` returning at once, `.result()` later; the spec is checked before any model
    loads. With `workers` > 0 the CPU_BOUND rewards run in that many worker processes."""

    def __init__(self, spec, options=None, workers=0):
        self.weights = parse_reward_spec(spec)
        options = options or RewardOptions()
        self.range = reward_range(self.weights, options.remote_range)  # for the prompt tracker
        if "remote" in self.weights and not options.remote_url:  # before the others take minutes to load
            raise ValueError("reward 'remote' needs a reward server URL (RewardOptions.remote_url)")
        self.pooled = [name for name in self.weights if name in CPU_BOUND] if workers > 0 else []
        self.rewards = {name: REWARDS[name](options) for name in self.weights if name not in self.pooled}
        self.workers = workers
        self.pool = ScoringWorkers(self.pooled, workers) if self.pooled else None

    def __call__(self, images, prompts, metadata=None):
        return self.submit(images, prompts, metadata).result()

    def submit(self, images, prompts, metadata=None, total_only=False):
        """Start scoring (the pooled rewards in the workers, the others here, now); `.result()` gives
        (total [B], {name: term [B]}), or the total alone with total_only."""
        n = len(prompts)
        metadata = [{} for _ in prompts] if metadata is None else list(metadata)
        if images.shape[0] != n or len(metadata) != n:
            raise ValueError(f"got {images.shape[0]} images, {n} prompts and {len(metadata)} metadata dicts; "
                             "expected equal counts")
        # One image a task: OCR time varies between images, and small tasks keep every worker busy
        # to the end of the batch.
        pixels = to_pixels(images).numpy() if self.pooled else None
        terms = {name: [self.pool.submit(name, pixels[i:i + 1], prompts[i:i + 1], metadata[i:i + 1])
                        for i in range(n)] for name in self.pooled}
        terms.update({name: _score(name, reward, images, prompts, metadata) for name, reward in self.rewards.items()})

        def result():  # waits for the workers
            scores = {key: s for name in self.weights for key, s in _collected(name, terms[name], prompts).items()}
            total = sum(self.weights[name] * scores[name] for name in self.weights)
            return total if total_only else (total, scores)
        return SimpleNamespace(result=result)

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
            self.pool.close()


def _collected(name, term, prompts):
    """A term's scores {name: [B]}: as they are, or from a pooled reward's futures, one an image."""
    if isinstance(term, dict):
        return term
    scores = []
    for prompt, future in zip(prompts, term):
        try:
            scores += future.result()
        except WorkerError as error:
            raise RewardError(f"reward {name!r} failed on prompt {prompt!r}: {error}") from None
    return {name: torch.tensor(scores)}


def _score(name, reward, images, prompts, metadata):
    """One reward's checked scores {name: [B], name_part: [B] of any parts}; any failure as a RewardError
    naming the reward and the prompt, which a failing batch finds by scoring one image at a time."""
    where = f"on prompt {prompts[0]!r}" + (f" (first of {len(prompts)})" if len(prompts) > 1 else "")
    try:
        scores = reward(images, prompts, metadata)
        total, parts = scores if isinstance(scores, tuple) else (scores, {})
        scores = {key: s.detach().float().cpu() for key, s in
                  {name: total, **{f"{name}_{part}": s for part, s in parts.items()}}.items()}
    except RewardError:
        raise  # already names the reward and the prompt
    except RewardServerError as error:  # the server's fault, not any one prompt's
        raise RewardError(f"reward {name!r} failed {where}: {error}") from error
    except Exception as error:
        for i, prompt in enumerate(prompts):
            try:
                reward(images[i:i + 1], prompts[i:i + 1], metadata[i:i + 1])
            except Exception as single:
                raise RewardError(f"reward {name!r} failed on prompt {prompt!r}: {single}") from error
        raise RewardError(f"reward {name!r} failed on a batch of {len(prompts)} starting with prompt "
                          f"{prompts[0]!r}, though not on any one image alone: {error}") from error
    for s in scores.values():
        if s.shape != (len(prompts),):
            raise RewardError(f"reward {name!r} returned shape {list(s.shape)} {where}; expected [{len(prompts)}]")
    return scores  # non-finite scores pass: the trainer drops those samples and counts them
