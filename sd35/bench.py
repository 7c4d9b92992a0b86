"""How fast is RL fine-tuning of SD3.5 with minflow, and where does the time go?

    python sd35/bench.py --model=tiny                  # CPU: the tiny random pipeline (sd35/tiny.py)
    python sd35/bench.py --model=sd35m-random          # GPU: SD3.5-Medium's shapes, random weights
    python sd35/bench.py --model=sd35m-random --sweep  # plus throughput and memory over batch x resolution

Speed does not depend on weight values, so nothing is downloaded: `sd35m-random` builds the
real SD3.5-Medium transformer (sd35/tiny.py's SD35_MEDIUM_TRANSFORMER_CONFIG, 2.2B parameters)
and a VAE of the real SD3.5 VAE's config with random weights, and stands in random text
embeddings of the real shapes ([B, 333, 4096], pooled [B, 2048]) for the text encoders, whose
cost is counted as zero. `tiny` runs its real (tiny) text encoders.

Every measurement uses the trainer's policy: the transformer with a fresh rank-32 LoRA
(policy.add_lora, alpha 64) in the `--mixed_precision` dtype under autocast, as sd35/train.py
runs it. Each measurement runs `--warmup` times untimed, then `--repeats` times timed; tables
give the median, and on CUDA the peak of torch.cuda.max_memory_allocated over the timed runs
(reset before them). Timers synchronise the GPU.

What is measured:
  rollout    text embeddings, `--num_steps` Flow-GRPO SDE steps with CFG through
             minflow.rollout + policy.guided_velocity (both CFG branches in one batch), and
             the VAE decode (policy.decode) of `--group_size` trajectories; images/s.
  baseline   the same batch as a stock StableDiffusion3Pipeline-style loop runs it: two
             forward passes per step (unconditional, conditional) and the Flow-GRPO step with
             its log-prob spelled out in plain torch (`plain_rollout`); same model, dtype,
             conditioning and decode. Our speed is given as a ratio to it, and both must end
             on the same latents from the same initial and SDE noise.
  rewards    the OCR reward (RapidOCR on the CPU; its cost depends on what the images show,
             and random models draw no text) and JPEG compressibility, images/s, and OCR in
             a pool of 1 and `--reward_workers` processes, and in 1 and as many separate
             processes that share nothing (the machine's own limit); Stepwise-Flow-GRPO's intermediate
             rewards (minflow.step_rewards, T' = 5 Euler substeps per state) as they were
             (every state, one state per pass, scored serially) and as the trainer runs them
             (the needed states only, passes of 4 x `--group_size` rows, OCR in the pool while
             the next pass runs): passes, seconds per trajectory by kind of work, with JPEG
             compressibility (and OCR with --reward=ocr); and the rollout with its final OCR
             rewards (policy.rollout_in_chunks), each chunk scored in the pool while the next
             samples, against waiting for each chunk's scores.
  iteration  Stepwise's seconds per RL iteration over Flow-GRPO's, composed from the
             measurements above (rollout + final reward + intermediate rewards + the training
             micro-batches of each one's trained steps), before and after; and the toy's
             ratio from toy/train.py's own loop.
  training   forward + backward of minflow.policy_loss (CFG, LoRA gradients) on micro-batches
             of `--train_batch` transitions taken from the rollout, with and without gradient
             checkpointing, at beta 0 and at beta 0.004 (which adds the reference forward with
             the adapter off); transitions/s. One AdamW step runs inside each memory window,
             so peaks include the optimiser state.
  MFU        model FLOPs utilisation: the transformer's matmul FLOPs (`transformer_flops`,
             counted from its config) per second, over the matmul FLOP/s of this device
             measured in the same run with a large torch.matmul.
"""
import functools
import math
import multiprocessing
import os
import statistics
import sys
import time
from contextlib import nullcontext
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import torch
from diffusers import AutoencoderKL, SD3Transformer2DModel
from diffusers.utils import logging as diffusers_logging
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
from cli import flag  # noqa: E402
import minflow  # noqa: E402
from sd35 import policy  # noqa: E402
from sd35.data import load_prompts  # noqa: E402
from sd35.rewards import CPU_BOUND, RewardMix, worker_rewards  # noqa: E402
from sd35.models import SD35_MEDIUM_TRANSFORMER_CONFIG  # noqa: E402
from sd35 import models  # noqa: E402


@dataclass
class Settings:
    model: str = flag("tiny", ("tiny", "sd35m-random"))  # tiny (built in code, CPU-sized) or sd35m-random (SD3.5-M shapes, random weights; GPU)
    num_steps: int = flag(10, "[2, inf)")  # SDE steps per rollout, as the trainer samples
    group_size: int = flag(8, "[1, inf)")  # trajectories per rollout batch (one forward pass holds 2x this with CFG)
    resolution: int = flag(0, lambda v: None if v is not None and v >= 0 and v % 16 == 0 else
                           "0 (512 for sd35m-random, 64 for tiny) or a positive multiple of 16 (VAE 8x, patch 2)")  # image side in pixels
    guidance_scale: float = flag(4.5, "[1, 100]")  # CFG scale in rollouts and training; 1 switches CFG off
    mixed_precision: str = flag("auto", ("auto", "bf16", "fp16", "no"))  # auto = bf16 on CUDA, no (float32) on CPU
    train_batch: int = flag(8, "[1, inf)")  # transitions per forward-backward in the training measurements
    reward: str = flag("jpeg_compressibility", ("jpeg_compressibility", "ocr"))  # Stepwise's intermediate reward (ocr adds OCR rows)
    repeats: int = flag(3, "[1, inf)")  # timed runs per measurement (the median is reported)
    warmup: int = flag(1, "[0, inf)")  # untimed runs before each measurement (allocator, kernel selection, compilation)
    device: str = flag("", cli.DEVICE)  # "" = cuda if available, else cpu
    sweep: bool = flag(False, (False, True))  # add a table over resolution x batch size (256/512/1024 px; tiny: 64/128 px)
    sweep_batches: str = flag("1,4,8,16", lambda v: None if v and all(b.strip().isdecimal() and int(b) > 0 for b in v.split(","))
                              else "positive integers separated by commas")  # the sweep's batch sizes (rollout group and training micro-batch alike)
    compile: bool = flag(False, (False, True))  # also time rollout and training with the transformer blocks under torch.compile
    seed: int = flag(0, "[0, 1e18]")  # seeds the noise, the LoRA and the advantages
    reward_workers: int = flag(0, "[0, 1024]")  # N of the reward pool's rows (against 1); 0 = this machine's CPU cores


LORA_RANK, LORA_ALPHA = 32, 64  # the trainer's defaults (sd35/train.py)
DEFAULT_BETA = 0.004  # the trainer's default KL weight
BETAS = (0.0, DEFAULT_BETA)  # training is timed without and with the KL term's reference forward
NOISE_LEVEL = minflow.PRESETS["flow_grpo"].noise_level  # the Flow-GRPO SDE's a
SUBSTEPS = minflow.PRESETS["stepwise"].substeps  # T' of Stepwise's short-ODE clean estimates

# The SD3.5 VAE (stabilityai/stable-diffusion-3.5-medium, vae/config.json): 8x downsampling over
# four levels, 16 latent channels, no 1x1 convs around the latent.
SD35_VAE_CONFIG = dict(
    in_channels=3, out_channels=3, latent_channels=16,
    down_block_types=("DownEncoderBlock2D",) * 4, up_block_types=("UpDecoderBlock2D",) * 4,
    block_out_channels=(128, 256, 512, 512), layers_per_block=2, norm_num_groups=32, sample_size=1024,
    scaling_factor=1.5305, shift_factor=0.0609, use_quant_conv=False, use_post_quant_conv=False,
)
SD3_TEXT_TOKENS = 77 + 256  # CLIP's 77 tokens joined with T5's 256 (the trainer's max_sequence_length)
SD3_JOINT_DIM, SD3_POOLED_DIM = 4096, 2048  # T5-XXL width; CLIP-L (768) + CLIP-G (1280) pooled
# Published sizes of SD3.5's text encoders (CLIP-L, OpenCLIP bigG, T5-XXL encoder), which
# sd35m-random does not build but the trainer holds on the GPU next to the transformer.
SD3_TEXT_ENCODER_PARAMS = 123.7e6 + 694.7e6 + 4762.3e6
TIMESTEP_CHANNELS = 256  # diffusers' sinusoidal timestep features, input of the time-embedding MLP


# ----------------------------------------------------------------------------------
# FLOPs


def transformer_flops(config, latent_side, text_tokens):
    """Matmul FLOPs of one SD3Transformer2DModel forward pass for ONE row (one image, one CFG
    branch) -> {part: FLOPs}; R rows cost R times the sum.

    A matmul of [m, k] by [k, n] counts 2 m n k (a multiply and an add per term). With
    d = heads x head_dim, N = (latent_side / patch)^2 image tokens, M text tokens, L layers
    of which D have dual attention:
      q/k/v/out       L (4N + 3M) 2d^2 + (L - 1) M 2d^2   (the last block's text stream
                      still makes q/k/v for the joint attention, but has no output projection)
      MLPs            L N 16d^2 + (L - 1) M 16d^2         (d -> 4d -> d; none on the last text stream)
      dual attention  D N 8d^2                            (the extra image self-attention's q/k/v/out)
      attention       L 4 (N + M)^2 d + D 4 N^2 d         (QK^T and AV: joint, and dual self-attention)
      adaLN           per block d x 6d image (9d with dual attention) and d x 6d text (last
                      block: d x 2d), and the output norm's d x 2d; one row each (time embedding)
      embeddings      patch embed N (C p^2) d, final projection N d (p^2 C), text projection
                      M J d (J = T5 width), and the time and pooled-text MLPs (one row each)
    Left out: what is not a matmul (layer and q/k RMS norms, GELU, SiLU, softmax, modulation
    and residual arithmetic, the CFG combination), the LoRA adapters' matmuls (2 r (in + out)
    per row of each adapted projection: about 4 % of those projections at r = 32, d = 1536),
    the VAE and the text encoders.
    """
    c = config
    d = c["num_attention_heads"] * c["attention_head_dim"]
    p = c["patch_size"]
    n, m, layers = (latent_side // p) ** 2, text_tokens, c["num_layers"]
    dual = sum(1 for i in set(c["dual_attention_layers"]) if i < layers)

    def lin(rows, fan_in, fan_out):
        return 2 * rows * fan_in * fan_out

    return {
        "q/k/v/out projections": layers * (4 * lin(n, d, d) + 3 * lin(m, d, d)) + (layers - 1) * lin(m, d, d),
        "MLPs": layers * 2 * lin(n, d, 4 * d) + (layers - 1) * 2 * lin(m, d, 4 * d),
        "dual-attention projections": dual * 4 * lin(n, d, d),
        "attention QK^T and AV": layers * 4 * (n + m) ** 2 * d + dual * 4 * n**2 * d,
        "adaLN modulation": (layers - dual) * lin(1, d, 6 * d) + dual * lin(1, d, 9 * d)
                            + (layers - 1) * lin(1, d, 6 * d) + lin(1, d, 2 * d) + lin(1, d, 2 * d),
        "embeddings and output": lin(n, c["in_channels"] * p * p, d) + lin(n, d, p * p * c["out_channels"])
                                 + lin(m, c["joint_attention_dim"], c["caption_projection_dim"])
                                 + lin(1, TIMESTEP_CHANNELS, d) + lin(1, c["pooled_projection_dim"], d) + 2 * lin(1, d, d),
    }


@torch.no_grad()
def peak_matmul_flops(device, dtype):
    """This device's matmul FLOP/s in `dtype` (float32 on CPU), measured with repeated n^3
    matmuls: n = 8192 on CUDA, 1024 on CPU (larger ones take seconds there) -> (FLOP/s, how)."""
    dtype = dtype if device.type == "cuda" else torch.float32
    n, reps = (8192, 20) if device.type == "cuda" else (1024, 5)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b  # the first call selects kernels and warms the allocator
    watch = Stopwatch(device)
    for _ in range(reps):
        a @ b
    watch.lap("matmul")
    return 2 * n**3 * reps / watch.seconds["matmul"], f"{n}^3 {str(dtype).removeprefix('torch.')} torch.matmul"


# ----------------------------------------------------------------------------------
# Models


@dataclass
class Model:
    transformer: SD3Transformer2DModel
    vae: AutoencoderKL
    encode: Callable[[list[str]], policy.PromptEmbeddings]  # prompts -> conditioning (with the empty prompt for CFG)
    text_encoders_built: bool  # False: memory figures lack the text encoders' weights


def random_sd35m(device, dtype):
    """SD3.5-Medium's transformer and VAE with random weights, created directly on `device` in
    `dtype` (by switching the default dtype: no float32 copy to cast). Seconds on a GPU; on
    the meta device it allocates nothing."""
    previous = torch.get_default_dtype()
    torch.set_default_dtype(dtype)
    try:
        with torch.device(device):
            transformer = SD3Transformer2DModel(**SD35_MEDIUM_TRANSFORMER_CONFIG)
            vae = AutoencoderKL(**SD35_VAE_CONFIG)
    finally:
        torch.set_default_dtype(previous)
    for part in (transformer, vae):
        part.requires_grad_(False).eval()
    return transformer, vae


def load_model(name, device, dtype, guidance_scale, seed):
    """"tiny": the tiny pipeline's parts and its real text encoders; "sd35m-random": random
    SD3.5-M parts and random conditioning of SD3's shapes."""
    if name == "tiny":
        pipe = models.load_pipeline("tiny", dtype, device)
        return Model(pipe.transformer, pipe.vae,
                     lambda prompts: policy.encode_prompts(pipe, prompts, guidance_scale, device), True)
    transformer, vae = random_sd35m(device, dtype)

    @functools.cache  # drawn once per batch size: the text encoders' cost is counted as zero
    def random_embeddings(batch):
        g = torch.Generator(device).manual_seed(seed)
        embeds = torch.randn(batch + 1, SD3_TEXT_TOKENS, SD3_JOINT_DIM, generator=g, device=device).to(dtype)
        pooled = torch.randn(batch + 1, SD3_POOLED_DIM, generator=g, device=device).to(dtype)
        if guidance_scale > 1:  # row 0 stands for the empty prompt
            return policy.PromptEmbeddings(embeds[1:], pooled[1:], embeds[:1], pooled[:1])
        return policy.PromptEmbeddings(embeds[1:], pooled[1:], None, None)

    return Model(transformer, vae, lambda prompts: random_embeddings(len(prompts)), False)


# ----------------------------------------------------------------------------------
# The baseline sampler


@torch.no_grad()
def plain_rollout(transformer, cond, noise, sigmas, guidance_scale, noise_level, generator, dtype, autocast=nullcontext):
    """The baseline, as a stock StableDiffusion3Pipeline-style loop writes it: per step one
    forward pass for the unconditional branch and one for the conditional, then the
    Flow-GRPO SDE step and its log-prob spelled out. The math of minflow.sde_step (flow_grpo),
    arranged differently on purpose, so that agreement checks both:

        h = t - t',  s = a sqrt(t / (1 - t)) (at t = 1, 1 - t' stands in for 1 - t),  std = s sqrt(h)
        mean = x (1 - h s^2 / (2t)) - v h (1 + s^2 (1 - t) / (2t)),  x' = mean + std eps
        log p(x') = mean over dims of -(x' - mean)^2 / (2 std^2) - log std - log(2 pi) / 2

    eps is drawn as minflow.rollout draws it (one float32 randn of x's shape per step from
    `generator`), so one seed gives both samplers the same noise. -> (states [B, T+1, ...],
    log-probs [B, T])."""
    x, batch = noise, noise.shape[0]
    states, log_probs = [x], []
    for i in range(len(sigmas) - 1):
        t, t_next = float(sigmas[i]), float(sigmas[i + 1])
        timestep = torch.full((batch,), t * 1000, device=x.device)  # the transformer takes sigma x 1000

        def forward(embeds, pooled):
            with autocast():
                return transformer(hidden_states=x.to(dtype), timestep=timestep, encoder_hidden_states=embeds,
                                   pooled_projections=pooled, return_dict=False)[0].float()

        if guidance_scale > 1:
            v_uncond = forward(cond.negative_embeds.expand(batch, -1, -1), cond.negative_pooled.expand(batch, -1))
            v_text = forward(cond.embeds, cond.pooled)
            v = v_uncond + guidance_scale * (v_text - v_uncond)
        else:
            v = forward(cond.embeds, cond.pooled)
        h = t - t_next
        s = noise_level * math.sqrt(t / (1 - (t_next if t >= 1 else t)))
        std = s * math.sqrt(h)
        mean = x.float() * (1 - h * s * s / (2 * t)) - v * h * (1 + s * s * (1 - t) / (2 * t))
        eps = torch.randn(x.shape, generator=generator, device=x.device, dtype=torch.float32)
        x_next = mean + std * eps
        log_density = -((x_next - mean) ** 2) / (2 * std * std) - math.log(std) - 0.5 * math.log(2 * math.pi)
        log_probs.append(log_density.flatten(1).mean(1))
        x = x_next.to(noise.dtype)
        states.append(x)
    return torch.stack(states, 1), torch.stack(log_probs, 1)


# ----------------------------------------------------------------------------------
# Timing


class Stopwatch:
    """Seconds per named lap (laps of the same name add up); synchronises CUDA first, since
    kernels run asynchronously."""

    def __init__(self, device):
        self.device, self.seconds = device, {}
        self.last = self.now()

    def now(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self, name):
        now = self.now()
        self.seconds[name] = self.seconds.get(name, 0.0) + now - self.last
        self.last = now


def measure(run, s, device):
    """`run()` -> (seconds by lap, result), called s.warmup times, then s.repeats times timed
    -> (median seconds by lap and "total", peak bytes (None on CPU), the last result)."""
    for _ in range(s.warmup):
        run()
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    laps = []
    for _ in range(s.repeats):
        seconds, result = run()
        laps.append({**seconds, "total": sum(seconds.values())})
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {k: statistics.median(lap[k] for lap in laps) for k in laps[0]}, peak, result


def gib(peak):
    return "n/a (CPU)" if peak is None else f"{peak / 2**30:.2f} GiB"


def print_table(title, header, rows):
    cells = [header] + [[str(c) for c in row] for row in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(header))]
    print(f"\n{title}")
    for i, row in enumerate(cells):
        print("  ".join(c.ljust(w) if j == 0 else c.rjust(w) for j, (c, w) in enumerate(zip(row, widths))))
        if i == 0:
            print("  ".join("-" * w for w in widths))


# ----------------------------------------------------------------------------------
# The measurements


class Bench:
    """The run's fixed parts (device, dtype, LoRA'd model, optimiser, prompts) and one method
    per kind of measurement, each -> measure()'s (seconds, peak, result)."""

    def __init__(self, s):
        self.s = s
        self.device = torch.device(s.device or ("cuda" if torch.cuda.is_available() else "cpu"))
        self.precision = s.mixed_precision if s.mixed_precision != "auto" else (
            "bf16" if self.device.type == "cuda" else "no")
        self.dtype = {"bf16": torch.bfloat16, "fp16": torch.float16, "no": torch.float32}[self.precision]
        self.autocast = nullcontext if self.precision == "no" else (
            lambda: torch.autocast(self.device.type, dtype=self.dtype))
        self.resolution = s.resolution or (64 if s.model == "tiny" else 512)
        self.cfg_rows = 2 if s.guidance_scale > 1 else 1  # transformer rows per image
        torch.manual_seed(s.seed)  # the LoRA's A matrices
        watch = Stopwatch(self.device)
        self.model = load_model(s.model, self.device, self.dtype, s.guidance_scale, s.seed)
        watch.lap("build")
        self.build_seconds = watch.seconds["build"]
        self.lora = policy.add_lora(self.model.transformer, LORA_RANK, LORA_ALPHA)
        self.opt = torch.optim.AdamW(self.lora, lr=3e-4)
        self.prompts = load_prompts("ocr")[0]  # OCR prompts: their target texts feed the OCR reward
        self.workers = s.reward_workers or len(os.sched_getaffinity(0))

    def batch(self, size):
        """`size` prompts and their metadata, cycling through the prompt set."""
        chosen = [self.prompts[i % len(self.prompts)] for i in range(size)]
        return [p for p, _ in chosen], [m for _, m in chosen]

    def rollout(self, size, resolution, plain=False):
        """Encode, sample and decode `size` trajectories, ours or (plain) the baseline's way
        -> result (conditioning, trajectory, images)."""
        texts, _ = self.batch(size)
        latent = resolution // 8
        noise = torch.randn((size, self.model.transformer.config.in_channels, latent, latent),
                            generator=torch.Generator().manual_seed(self.s.seed)).to(self.device)
        sigmas = minflow.sd3_sigmas(self.s.num_steps)

        def once():
            watch = Stopwatch(self.device)
            cond = self.model.encode(texts)
            watch.lap("encode")
            generator = torch.Generator(self.device).manual_seed(self.s.seed)
            if plain:
                xs, log_probs = plain_rollout(self.model.transformer, cond, noise, sigmas, self.s.guidance_scale,
                                              NOISE_LEVEL, generator, self.dtype, self.autocast)
                traj = minflow.Trajectory(xs, log_probs, None, sigmas)
            else:
                velocity = policy.guided_velocity(self.model.transformer, cond, self.s.guidance_scale, self.dtype,
                                                  None, self.autocast)
                traj = minflow.rollout(velocity, noise, sigmas, "flow_grpo", NOISE_LEVEL, generator)
            watch.lap("sample")
            images = policy.decode(self.model.vae, traj.xs[:, -1])
            watch.lap("decode")
            return watch.seconds, (cond, traj, images)

        return measure(once, self.s, self.device)

    def rollout_scored(self, mix, cond, noise, chunk, overlap):
        """Rollout and final rewards of a batch through policy.rollout_in_chunks, as the
        trainer runs them (torch keeping the cores `mix`'s workers leave): with `overlap`,
        each chunk is scored in the pool while the next samples; without, each chunk's
        scores are waited for before the next samples."""
        texts, metadata = self.batch(noise.shape[0])
        sigmas = minflow.sd3_sigmas(self.s.num_steps)
        velocity = policy.guided_velocity(self.model.transformer, cond, self.s.guidance_scale, self.dtype, None,
                                          self.autocast)

        def score(x, rows):
            rows = rows.tolist()
            pending = mix.submit(policy.decode(self.model.vae, x), [texts[i] for i in rows],
                                 [metadata[i] for i in rows], total_only=True)
            if not overlap:
                pending.result()
            return pending

        def once():
            watch = Stopwatch(self.device)
            generator = torch.Generator(self.device).manual_seed(self.s.seed)
            with mix.leave_cores_to_workers():
                _, scores = policy.rollout_in_chunks(velocity, noise, sigmas, "flow_grpo", NOISE_LEVEL, generator,
                                                     chunk, score)
                for _, pending in scores:
                    pending.result()
                watch.lap("rollout_and_reward")
            return watch.seconds, None

        return measure(once, self.s, self.device)

    def reward(self, mix, images, call=None):
        """Rewards of a batch of final images: one call, or (`call`) calls of that many images
        submitted one after another, as the trainer submits its chunks, then collected."""
        texts, metadata = self.batch(len(images))
        call = call or len(images)

        def once():
            watch = Stopwatch(self.device)
            pending = [mix.submit(images[i:i + call], texts[i:i + call], metadata[i:i + call])
                       for i in range(0, len(images), call)]
            for scores in pending:
                scores.result()
            watch.lap("reward")
            return watch.seconds, None

        return measure(once, self.s, self.device)

    def stepwise(self, mix, cond, traj, needed=None, batch_size=None):
        """Stepwise's intermediate rewards of a trajectory batch (the final reward given, as the
        trainer does), timed by kind of work -> result: calls by kind (a velocity call is one
        pass over up to `batch_size` (trajectory, state) rows; a decode decodes one pass's
        clean estimates). With a pooled `mix`, the reward lap is what is left to wait for
        after the last pass, since the workers score while the next pass runs."""
        texts, metadata = self.batch(traj.xs.shape[0])
        guided = policy.guided_velocity(self.model.transformer, cond, self.s.guidance_scale, self.dtype, None,
                                        self.autocast)

        def once():
            watch, calls, pending = Stopwatch(self.device), {"velocity": 0, "decode": 0}, []

            def velocity(x, t, rows):
                calls["velocity"] += 1
                return guided(x, t, rows)

            def reward(x0, rows):
                watch.lap("velocity")  # the substeps that produced these clean estimates
                calls["decode"] += 1
                images = policy.decode(self.model.vae, x0, self.s.group_size)
                watch.lap("decode")
                pending.append(mix.submit(images, [texts[i] for i in rows], [metadata[i] for i in rows], True))
                watch.lap("reward")
                return pending[-1]

            with mix.leave_cores_to_workers():
                minflow.step_rewards(velocity, traj, reward, SUBSTEPS, final=torch.zeros(traj.xs.shape[0]),
                                     needed=needed, batch_size=batch_size)
                watch.lap("reward")
            return watch.seconds, calls

        return measure(once, self.s, self.device)

    def train(self, cond, rows, train_batch, beta, checkpointing):
        """Forward + backward of minflow.policy_loss on micro-batches of `train_batch` rows, as
        sd35/train.py's `optimise` runs them (rows repeat if there are fewer), then one AdamW
        step inside the same memory window -> (seconds per micro-batch, peak bytes)."""
        transformer = self.model.transformer
        idx = torch.arange(train_batch) % len(rows["advantage"])
        batch = {k: rows[k][idx].to(self.device) for k in ("x", "x_next", "t", "t_next", "old_log_prob", "advantage")}
        step_cond = cond.select(rows["sample"][idx])
        velocity = policy.guided_velocity(transformer, step_cond, self.s.guidance_scale, self.dtype, None, self.autocast)

        def ref_velocity(x, t):
            with policy.adapter_disabled(transformer):
                return velocity(x, t)

        def once():
            watch = Stopwatch(self.device)
            loss, _ = minflow.policy_loss(velocity, batch["x"], batch["x_next"], batch["t"], batch["t_next"],
                                          batch["old_log_prob"], batch["advantage"], "flow_grpo", NOISE_LEVEL,
                                          clip_range=1e-4, beta=beta, ref_velocity=ref_velocity)
            loss.backward()
            watch.lap("train")
            return watch.seconds, None

        if checkpointing:
            transformer.enable_gradient_checkpointing()
        try:
            seconds, peak, _ = measure(once, self.s, self.device)
            self.opt.step()
            if peak is not None:  # the window is still open: read it again after the step
                peak = torch.cuda.max_memory_allocated(self.device)
        finally:
            self.opt.zero_grad(set_to_none=True)
            transformer.disable_gradient_checkpointing()
        return seconds["total"], peak

    def flops_per_row(self, resolution, text_tokens):
        return sum(transformer_flops(self.model.transformer.config, resolution // 8, text_tokens).values())


def training_rows(traj, seed):
    """The rollout's trained transitions as training rows, with random +-1 advantages (values
    do not change the cost)."""
    stds = minflow.step_std(traj.sigmas[:-1], traj.sigmas[1:], "flow_grpo", NOISE_LEVEL)
    mask = minflow.trained_steps(stds).expand(traj.xs.shape[0], -1)
    signs = torch.randint(2, mask.shape, generator=torch.Generator().manual_seed(seed)) * 2.0 - 1
    return minflow.transitions(traj, signs, mask)


# ----------------------------------------------------------------------------------
# The report, one table per section


def report_rollout(bench, out):
    B, T = bench.s.group_size, bench.s.num_steps
    ours, ours_peak, (cond, traj, images) = bench.rollout(B, bench.resolution)
    plain, plain_peak, (_, plain_traj, _) = bench.rollout(B, bench.resolution, plain=True)
    print_table(f"Rollout: {B} trajectories, {T} steps with CFG, decoded; median seconds per batch", [
        "sampler", "encode s", "sample s", "decode s", "total s", "images/s", "ratio", "peak memory"], [
        [name, f"{r['encode']:.3f}", f"{r['sample']:.3f}", f"{r['decode']:.3f}", f"{r['total']:.3f}",
         f"{B / r['total']:.2f}", f"{plain['total'] / r['total']:.2f}x", gib(peak)]
        for name, r, peak in (("minflow (CFG in one batch)", ours, ours_peak),
                              ("plain baseline (2 passes/step)", plain, plain_peak))])
    if not bench.model.text_encoders_built:
        print("(encode: random embeddings of the real shapes, counted as free)")

    final, plain_final = traj.xs[:, -1].float(), plain_traj.xs[:, -1].float()
    tolerance = 1e-4 if bench.dtype == torch.float32 else 5e-2  # bf16 keeps 8 bits; 10 steps compound them
    diff = (final - plain_final).abs().max()
    agreement = {"max_abs_diff": diff.item(), "relative_max_diff": (diff / plain_final.abs().max()).item(),
                 "log_prob_max_diff": (traj.log_probs - plain_traj.log_probs).abs().max().item(),
                 "latent_movement": (final - traj.xs[:, 0].float()).abs().max().item(), "tolerance": tolerance}
    agreement["agree"] = agreement["relative_max_diff"] <= tolerance
    print_table("Same initial noise, same SDE noise: do both samplers end on the same latents?", [
        "max |ours - plain|", "relative to max |latent|", "log-prob max diff", "max |x_0 - x_1| (movement)",
        "verdict"], [[f"{agreement['max_abs_diff']:.2e}", f"{agreement['relative_max_diff']:.2e}",
                      f"{agreement['log_prob_max_diff']:.2e}", f"{agreement['latent_movement']:.3f}",
                      f"{'agree' if agreement['agree'] else 'DIFFER'} (tolerance {tolerance:g})"]])
    text_tokens = cond.embeds.shape[1]
    out["agreement"] = agreement
    out["throughput"].update({"rollout_images_per_s": B / ours["total"], "baseline_images_per_s": B / plain["total"],
                              "rollout_ratio_to_baseline": plain["total"] / ours["total"],
                              "sampling_ratio_to_baseline": plain["sample"] / ours["sample"]})
    out["rollout_flops"] = T * bench.cfg_rows * B * bench.flops_per_row(bench.resolution, text_tokens)
    out["rollout_seconds"] = ours
    return cond, traj, images


def report_rewards(bench, out, cond, traj, images):
    s, B, T = bench.s, bench.s.group_size, bench.s.num_steps
    mixes = {"ocr": RewardMix("ocr"), "jpeg_compressibility": RewardMix("jpeg_compressibility")}
    rows = []
    for name, mix in mixes.items():
        seconds, peak, _ = bench.reward(mix, images)
        out["throughput"][f"{name}_images_per_s"] = B / seconds["total"]
        rows.append([name, "in this process", f"{seconds['total'] / B:.4f}", f"{B / seconds['total']:.2f}", gib(peak)])
    # OCR in the worker pool, 1 and N processes, on 16 images a worker (the rollout's,
    # repeated) submitted in calls of B without waiting, as the trainer streams its chunks.
    # The pools are started and warmed before timing.
    many = images.repeat(math.ceil(16 * bench.workers / B), 1, 1, 1)
    ocr_pools = {workers: RewardMix("ocr", workers=workers) for workers in sorted({1, bench.workers})}
    pools = {"ocr": ocr_pools[bench.workers], "jpeg_compressibility": RewardMix("jpeg_compressibility", workers=bench.workers)}
    for pooled in [*ocr_pools.values(), pools["jpeg_compressibility"]]:
        pooled(many, *bench.batch(len(many)))  # starts every worker and its engine: untimed
    for workers, pooled in ocr_pools.items():
        seconds, peak, _ = bench.reward(pooled, many, call=B)
        out["throughput"][f"ocr_images_per_s_{workers}_workers"] = len(many) / seconds["total"]
        rows.append(["ocr", f"{workers} worker process{'es' if workers > 1 else ''}",
                     f"{seconds['total'] / len(many):.4f}", f"{len(many) / seconds['total']:.2f}", gib(peak)])
    # The machine's own limit: the same images split over 1 and N plain processes that share
    # nothing (no pool, no queue), each timing its own single-threaded OCR.
    for processes in sorted({1, bench.workers}):
        seconds = ocr_in_separate_processes(many, *bench.batch(len(many)), processes, s.repeats)
        out["throughput"][f"ocr_images_per_s_{processes}_separate_processes"] = len(many) / seconds
        rows.append(["ocr", f"{processes} separate process{'es' if processes > 1 else ''}, no pool",
                     f"{seconds / len(many):.4f}", f"{len(many) / seconds:.2f}", "n/a (CPU)"])
    tp = out["throughput"]
    out["ocr_speedup_with_workers"] = tp[f"ocr_images_per_s_{bench.workers}_workers"] / tp["ocr_images_per_s_1_workers"]
    out["ocr_speedup_with_separate_processes"] = (tp[f"ocr_images_per_s_{bench.workers}_separate_processes"]
                                                  / tp["ocr_images_per_s_1_separate_processes"])
    print_table(f"Rewards of final images ({B} a call in this process, {len(many)} in calls of {B} to the pool; OCR of "
                f"{bench.workers} workers against 1: {out['ocr_speedup_with_workers']:.2f}x; of {bench.workers} separate "
                f"processes against 1: {out['ocr_speedup_with_separate_processes']:.2f}x)",
                ["reward", "where", "s / image", "images/s", "peak memory"], rows)

    # Before: every state, one state per pass, scored serially. After: only the states the
    # trained gains need (Stepwise's ddim sampler), passes of up to 4 groups' worth of rows,
    # OCR in the pool while the next pass runs.
    sigmas = traj.sigmas
    needed = minflow.needed_states(minflow.step_std(sigmas[:-1], sigmas[1:], "ddim", NOISE_LEVEL))
    rows = []
    for name in ("jpeg_compressibility", "ocr") if s.reward == "ocr" else ("jpeg_compressibility",):
        pooled = pools[name]
        for how, mix, kwargs in (("every state, state by state, serial", mixes[name], {"batch_size": B}),
                                 ("needed states, batched" + (f", {bench.workers} workers" if pooled.pool else ""), pooled,
                                  {"needed": needed, "batch_size": 4 * B})):
            seconds, peak, calls = bench.stepwise(mix, cond, traj, **kwargs)
            key = f"stepwise_{name}" + ("" if "every" in how else "_batched")
            out["throughput"][f"{key}_trajectories_per_s"] = B / seconds["total"]
            out[f"{key}_calls"] = calls
            out[f"{key}_seconds"] = seconds["total"]
            lap = {k: seconds.get(k, 0.0) / B for k in ("velocity", "decode", "reward")}
            rows.append([name, how, f"{calls['velocity']}", f"{calls['decode']}", f"{lap['velocity']:.4f}",
                         f"{lap['decode']:.4f}", f"{lap['reward']:.4f}", f"{seconds['total'] / B:.4f}",
                         f"{seconds['total'] / out['rollout_seconds']['total']:.1f}x", gib(peak)])
    print_table(f"Stepwise intermediate rewards, per trajectory: up to {T} states x T' = {SUBSTEPS} Euler substeps "
                f"({int(needed[:-1].sum())} states needed by ddim's trained gains; the final reward is the rollout's)", [
        "reward", "how", "velocity passes", "decode passes", "velocity s", "decode s", "reward s", "total s",
        "vs rollout", "peak memory"], rows)

    # Final OCR rewards overlapped with sampling: the rollout in chunks of a quarter of the
    # batch, each scored before the next samples, or while it samples; and, for the cost of
    # chunking itself, the whole batch sampled first.
    noise, chunk = traj.xs[:, 0], max(1, B // 4)
    rows = []
    for key, how, size, overlap in (("whole", f"all {B} sampled, then scored", B, False),
                                    ("sequential", f"chunks of {chunk}, each scored before the next samples", chunk, False),
                                    ("overlapped", f"chunks of {chunk}, each scored while the next samples", chunk, True)):
        seconds, peak, _ = bench.rollout_scored(pools["ocr"], cond, noise, size, overlap)
        out[f"rollout_ocr_{key}_seconds"] = seconds["total"]
        rows.append([how, f"{seconds['total']:.3f}", gib(peak)])
    out["throughput"]["rollout_ocr_overlap_speedup"] = (out["rollout_ocr_sequential_seconds"]
                                                        / out["rollout_ocr_overlapped_seconds"])
    for pooled in [*ocr_pools.values(), pools["jpeg_compressibility"]]:
        pooled.close()
    print_table(f"Rollout and final OCR of {B} trajectories, {bench.workers} workers (overlapped against "
                f"sequential chunks: {out['throughput']['rollout_ocr_overlap_speedup']:.2f}x)",
                ["how", "s", "peak memory"], rows)


def ocr_in_separate_processes(images, prompts, metadata, processes, repeats):
    """Seconds to OCR `images` split over `processes` fresh processes that share nothing, each
    set up as a reward pool worker is (rewards.worker_rewards) and warmed on its share:
    the median over `repeats` runs, started together, of the slowest process's time."""
    context = multiprocessing.get_context("spawn")
    start, results = context.Barrier(processes), context.Queue()
    workers = [context.Process(target=time_ocr_alone, args=(images[rows], [prompts[i] for i in rows.tolist()],
                                                            [metadata[i] for i in rows.tolist()], repeats, start, results))
               for rows in torch.arange(len(images)).tensor_split(processes)]
    for worker in workers:
        worker.start()
    seconds = [results.get(timeout=600) for _ in workers]  # each process's list of `repeats` times
    for worker in workers:
        worker.join()
    return statistics.median(max(run) for run in zip(*seconds))


def time_ocr_alone(images, prompts, metadata, repeats, start, results):
    """One of ocr_in_separate_processes' processes."""
    ocr = worker_rewards(["ocr"])["ocr"]
    ocr(images, prompts, metadata)
    seconds = []
    for _ in range(repeats):
        start.wait()
        begin = time.perf_counter()
        ocr(images, prompts, metadata)
        seconds.append(time.perf_counter() - begin)
    results.put(seconds)


def report_iteration(bench, out):
    """Seconds per RL iteration of Stepwise as a ratio to Flow-GRPO's, composed from this run's
    measurements (same model, same batch): rollout + final reward + intermediate rewards (Stepwise
    only) + the training micro-batches of each algorithm's trained steps."""
    s, B, tp = bench.s, bench.s.group_size, out["throughput"]
    sigmas = minflow.sd3_sigmas(s.num_steps)
    per_micro_batch = out["training"][False, DEFAULT_BETA][0]

    def trained(sampler):
        return int(minflow.trained_steps(minflow.step_std(sigmas[:-1], sigmas[1:], sampler, NOISE_LEVEL)).sum())

    def training(sampler):
        return math.ceil(B * trained(sampler) / s.train_batch) * per_micro_batch

    rows = []
    for name in ("jpeg_compressibility", "ocr") if s.reward == "ocr" else ("jpeg_compressibility",):
        final = B / tp[f"{name}_images_per_s"]
        flow = out["rollout_seconds"]["total"] + final + training("flow_grpo")
        for how, key in (("before: every state, serial", f"stepwise_{name}"),
                         ("after: needed states, batched" + (f", {bench.workers} workers" if name in CPU_BOUND else ""),
                          f"stepwise_{name}_batched")):
            stepwise = out["rollout_seconds"]["total"] + final + out[f"{key}_seconds"] + training("ddim")
            out["throughput"][f"{key}_iteration_ratio"] = stepwise / flow
            rows.append([name, how, f"{flow:.3f}", f"{stepwise:.3f}", f"{stepwise / flow:.2f}x"])
    toy = toy_iteration_seconds()
    out["throughput"]["toy_stepwise_iteration_ratio"] = toy["stepwise"] / toy["flow_grpo"]
    rows.append(["toy (2D, CPU)", "toy/train.py, 128 trajectories, fastest of 3", f"{toy['flow_grpo']:.4f}", f"{toy['stepwise']:.4f}",
                 f"{toy['stepwise'] / toy['flow_grpo']:.2f}x"])
    print_table(f"Seconds per iteration, Stepwise against Flow-GRPO (sd35: composed from this run's rollout, rewards "
                f"and training micro-batches; {trained('flow_grpo')} and {trained('ddim')} trained steps)",
                ["reward", "Stepwise's intermediate rewards", "Flow-GRPO s", "Stepwise s", "ratio"], rows)


def toy_iteration_seconds(iters=5, runs=3):
    """Seconds per iteration of the toy's Flow-GRPO and Stepwise runs (toy/train.py's own loop
    and timer, evaluation excluded), the fastest of `runs` runs of `iters` iterations each (a
    toy iteration takes tens of milliseconds, so other jobs on the machine swamp a mean), on a
    briefly pretrained base: speed does not depend on how good the base is."""
    from toy import flow
    from toy import train as toy_train

    base = flow.pretrain(steps=50, batch=256, cache=False)
    cfg = toy_train.Config(iters=iters, eval_every=iters, eval_samples=8)
    with open(os.devnull, "w") as quiet:
        progress = tqdm(total=2 * iters * runs, file=quiet)
        return {name: min(toy_train.train(base, minflow.PRESETS[name], cfg, 0, progress)["seconds"] / iters
                          for _ in range(runs)) for name in ("flow_grpo", "stepwise")}


def report_training(bench, out, cond, traj):
    s = bench.s
    rows, table, results = training_rows(traj, s.seed), [], {}
    for checkpointing in (False, True):
        for beta in BETAS:
            seconds, peak = bench.train(cond, rows, s.train_batch, beta, checkpointing)
            results[checkpointing, beta] = (seconds, peak)
            table.append(["on" if checkpointing else "off", f"{beta:g}", f"{seconds:.3f}",
                          f"{s.train_batch / seconds:.2f}", gib(peak)])
            out["throughput"][f"train_checkpointing={'on' if checkpointing else 'off'}_beta={beta:g}"
                              "_transitions_per_s"] = s.train_batch / seconds
    print_table(f"Training: forward + backward of policy_loss on micro-batches of {s.train_batch} transitions "
                f"(CFG, LoRA r{LORA_RANK}; peak includes an AdamW step)", [
        "gradient checkpointing", "beta", "s / micro-batch", "transitions/s", "peak memory"], table)
    out["training"] = results
    return rows


def report_mfu(bench, out, text_tokens):
    config = bench.model.transformer.config
    parts = transformer_flops(config, bench.resolution // 8, text_tokens)
    total = sum(parts.values())
    image_tokens = (bench.resolution // 8 // config.patch_size) ** 2
    print_table(f"Transformer matmul FLOPs of one forward row ({image_tokens} image + {text_tokens} text tokens)",
                ["part", "GFLOP", "share"], [[k, f"{v / 1e9:.3f}", f"{100 * v / total:.1f} %"] for k, v in parts.items()]
                + [["total", f"{total / 1e9:.3f}", "100 %"]])

    peak, how = peak_matmul_flops(bench.device, bench.dtype)
    out["throughput"]["peak_matmul_flops"] = peak
    sampling = out["rollout_flops"] / out["rollout_seconds"]["sample"]
    out["mfu"] = {"rollout_sampling": sampling / peak}
    rows = [["rollout, sampling stage", f"{out['rollout_flops'] / 1e12:.4f} per batch", f"{sampling / 1e12:.4f}",
             f"{100 * sampling / peak:.2f} %"]]
    for (checkpointing, beta), (seconds, _) in out["training"].items():
        # Forward + backward counts 3 forwards (the usual convention), the reference forward
        # (beta > 0) one more. The base weights are frozen, so their weight gradients are never
        # computed: the work really done is nearer 2 forwards for the linear layers, and this
        # MFU overstates the hardware's use by up to 1.5x.
        flops = (3 + (beta > 0)) * bench.cfg_rows * bench.s.train_batch * total
        name = f"training, checkpointing {'on' if checkpointing else 'off'}, beta {beta:g}"
        out["mfu"][f"train_checkpointing={'on' if checkpointing else 'off'}_beta={beta:g}"] = flops / seconds / peak
        rows.append([name, f"{flops / 1e12:.4f} per micro-batch", f"{flops / seconds / 1e12:.4f}",
                     f"{100 * flops / seconds / peak:.2f} %"])
    print_table(f"MFU against this device's measured peak: {peak / 1e12:.3f} TFLOP/s ({how}). Training counts "
                "3 forwards by convention (+1 for the reference at beta > 0; frozen weights make it nearer 2 "
                "really); checkpointing's recomputation is not counted",
                ["measurement", "TFLOP", "achieved TFLOP/s", "MFU"], rows)
    out["peak_how"] = how


def report_sweep(bench, out):
    """Throughput and peak memory over resolution x batch size (the training micro-batch equals
    the rollout batch; beta 0.004); a cell that runs out of memory says OOM."""
    s = bench.s
    resolutions = (64, 128) if s.model == "tiny" else (256, 512, 1024)
    table = []
    for res in resolutions:
        for size in (int(b) for b in s.sweep_batches.split(",")):
            row = [f"{res}", f"{size}"]
            try:
                seconds, peak, (cond, traj, _) = bench.rollout(size, res)
                row += [f"{size / seconds['total']:.2f}", gib(peak)]
                rows = training_rows(traj, s.seed)
                for checkpointing in (False, True):
                    seconds, peak = bench.train(cond, rows, size, DEFAULT_BETA, checkpointing)
                    row += [f"{size / seconds:.2f}", gib(peak)]
                    key = f"sweep_{res}px_batch{size}_checkpointing={'on' if checkpointing else 'off'}_transitions_per_s"
                    out["throughput"][key] = size / seconds
            except torch.OutOfMemoryError:  # the allocator frees its cache and retries before raising, so go on
                row += ["OOM"] * (8 - len(row))
            table.append(row)
    scale = "tiny model: 64/128 px stand in for 256/512/1024" if s.model == "tiny" else "256/512/1024 px"
    print_table(f"Sweep over resolution x batch ({scale}; {s.num_steps} steps, CFG; training at beta "
                f"{DEFAULT_BETA}, micro-batch = batch)", [
        "px", "batch", "rollout images/s", "rollout peak", "train trans/s", "train peak", "ckpt trans/s",
        "ckpt peak"], table)


def report_compiled(bench, out, cond, rows):
    """The rollout and the default training micro-batch again, every transformer block under
    torch.compile; does compiling pay?"""
    s = bench.s
    watch = Stopwatch(bench.device)
    for block in bench.model.transformer.transformer_blocks:
        block.compile()
    # The first measurement of each compiles (forward; backward for training) and is discarded.
    bench.rollout(s.group_size, bench.resolution)
    watch.lap("compile")
    bench.train(cond, rows, s.train_batch, DEFAULT_BETA, False)
    compiled, _, _ = bench.rollout(s.group_size, bench.resolution)
    train_seconds, _ = bench.train(cond, rows, s.train_batch, DEFAULT_BETA, False)
    eager, eager_train = out["rollout_seconds"], out["training"][False, DEFAULT_BETA][0]
    print_table(f"torch.compile of the transformer blocks (compiling and the first rollout measurement: "
                f"{watch.seconds['compile']:.1f} s)", ["measurement", "eager s", "compiled s", "speed-up"], [
        ["rollout, sampling stage", f"{eager['sample']:.3f}", f"{compiled['sample']:.3f}",
         f"{eager['sample'] / compiled['sample']:.2f}x"],
        [f"training micro-batch, beta {DEFAULT_BETA}", f"{eager_train:.3f}", f"{train_seconds:.3f}",
         f"{eager_train / train_seconds:.2f}x"]])
    out["throughput"]["compiled_rollout_images_per_s"] = s.group_size / compiled["total"]
    out["throughput"]["compiled_train_transitions_per_s"] = s.train_batch / train_seconds


def report_summary(bench, out):
    s, tp = bench.s, out["throughput"]
    seconds, peak = out["training"][False, DEFAULT_BETA]
    if peak is None:
        memory_note = "no accelerator"
    elif bench.model.text_encoders_built:
        memory_note = "text encoders included"
    else:  # what sd35/train.py holds on top: the three text encoders, in the same dtype
        text_bytes = SD3_TEXT_ENCODER_PARAMS * torch.finfo(bench.dtype).bits / 8
        memory_note = f"+ {gib(text_bytes)} of text encoders not built here = {gib(peak + text_bytes)}"
    a = out["agreement"]
    print_table("Summary", ["", "value", "note"], [
        ["rollout", f"{tp['rollout_images_per_s']:.2f} images/s",
         f"{tp['rollout_ratio_to_baseline']:.2f}x the plain baseline's {tp['baseline_images_per_s']:.2f} "
         f"(sampling alone {tp['sampling_ratio_to_baseline']:.2f}x)"],
        ["rollout MFU", f"{100 * out['mfu']['rollout_sampling']:.2f} %", "sampling stage"],
        ["same latents as baseline", f"{a['relative_max_diff']:.1e} relative", "agree" if a["agree"] else "DIFFER"],
        ["OCR reward", f"{tp['ocr_images_per_s']:.2f} images/s", "RapidOCR, CPU"],
        ["OCR reward, worker pool", f"{tp[f'ocr_images_per_s_{bench.workers}_workers']:.2f} images/s",
         f"{bench.workers} workers: {out['ocr_speedup_with_workers']:.2f}x one worker "
         f"({out['ocr_speedup_with_separate_processes']:.2f}x for separate processes)"],
        ["Rollout + final OCR overlapped", f"{tp['rollout_ocr_overlap_speedup']:.2f}x",
         "chunks scored while the next samples, against in turn"],
        ["Stepwise rewards (jpeg)", f"{1 / tp['stepwise_jpeg_compressibility_batched_trajectories_per_s']:.4f} s/trajectory",
         f"needed states, batched; {1 / tp['stepwise_jpeg_compressibility_trajectories_per_s']:.4f} every state, serially"],
        ["Stepwise / Flow-GRPO iteration (jpeg)", f"{tp['stepwise_jpeg_compressibility_batched_iteration_ratio']:.2f}x",
         f"{tp['stepwise_jpeg_compressibility_iteration_ratio']:.2f}x with every state scored serially"],
        ["Stepwise / Flow-GRPO iteration (toy)", f"{tp['toy_stepwise_iteration_ratio']:.2f}x", "toy/train.py's loop"],
        ["training", f"{s.train_batch / seconds:.2f} transitions/s",
         f"trainer defaults: no checkpointing, beta {DEFAULT_BETA}, micro-batch {s.train_batch}"],
        ["training MFU", f"{100 * out['mfu'][f'train_checkpointing=off_beta={DEFAULT_BETA:g}']:.2f} %", ""],
        ["training peak memory", gib(peak), memory_note],
        ["peak matmul", f"{tp['peak_matmul_flops'] / 1e12:.3f} TFLOP/s", out["peak_how"]],
    ])


def parse_settings(argv):
    """Flags -> Settings, each checked against its declared range, or a one-line ValueError."""
    return cli.read_flags(Settings, argv)


def main(argv):
    """Run every measurement and print the tables -> the numbers, for tests: "throughput"
    (positive rates and the peak FLOP/s), "mfu" (fractions), "agreement" (ours vs plain)."""
    try:
        s = parse_settings(argv)
    except ValueError as e:
        sys.exit(f"error: {e}")
    # The tiny tokenizers are per character, so CLIP truncates the prompts on every call and
    # diffusers would warn each time; its verbosity is restored on the way out.
    verbosity = diffusers_logging.get_verbosity()
    diffusers_logging.set_verbosity_error()
    try:
        return run(s)
    finally:
        diffusers_logging.set_verbosity(verbosity)


def run(s):
    """Build the model, run every measurement in order, print a table for each."""
    bench = Bench(s)
    max_px = bench.model.transformer.config.pos_embed_max_size * 16
    if bench.resolution > max_px:
        sys.exit(f"error: --resolution={bench.resolution} is larger than this model takes ({max_px} px)")
    print(f"{s.model} on {bench.device} ({bench.precision}), {bench.resolution} px, {s.num_steps} steps, "
          f"CFG {s.guidance_scale}, group {s.group_size}, train batch {s.train_batch}; built in "
          f"{bench.build_seconds:.1f} s; LoRA r{LORA_RANK}: {sum(p.numel() for p in bench.lora) / 1e6:.2f}M parameters; "
          f"median of {s.repeats} after {s.warmup} warmup")
    out = {"throughput": {}}
    cond, traj, images = report_rollout(bench, out)
    report_rewards(bench, out, cond, traj, images)
    rows = report_training(bench, out, cond, traj)
    report_iteration(bench, out)
    report_mfu(bench, out, cond.embeds.shape[1])
    if s.sweep:
        report_sweep(bench, out)
    if s.compile:
        report_compiled(bench, out, cond, rows)
    report_summary(bench, out)
    return out


if __name__ == "__main__":
    main(sys.argv[1:])
