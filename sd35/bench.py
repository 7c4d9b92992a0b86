"""How fast is RL fine-tuning of SD3.5 with minflow, and where do the time and memory go?

    python sd35/bench.py --model=tiny           # CPU: the tiny random pipeline
    python sd35/bench.py --model=sd35m-random   # GPU: SD3.5-Medium, random weights
    python sd35/bench.py --model=sd35m-random --trainer=true   # the GPU check: also 2 iterations of each algorithm

One table a question: what will the trainer hold in memory (estimated before loading), and how
fast are sampling and training, at what share of the device's matmul peak, in how much memory. As
sd35/train.py does, it encodes the prompts once, frees the text encoders and runs a fresh rank-32
LoRA under --mixed_precision's autocast. Each measurement runs --warmup times, then --repeats times
timed: the median, and on CUDA the peak memory. The trainer's log times the rewards and each
algorithm's iterations in the real loop.
"""
import re
import statistics
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch
from torch.utils.flop_counter import FlopCounterMode
from diffusers.utils import logging as diffusers_logging
from transformers.utils import logging as transformers_logging

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import minflow  # noqa: E402
from cli import flag  # noqa: E402
from sd35 import models, policy  # noqa: E402
from sd35.curves import read_log  # noqa: E402
from sd35.data import load_prompts  # noqa: E402
from sd35.workers import ScoringWorkers  # noqa: E402


@dataclass
class Settings:
    model: str = flag("tiny", models.MODEL)  # tiny for a CPU; sd35m-random (no download) for a GPU
    num_steps: int = flag(10, "[2, inf)")  # SDE steps per rollout, as the trainer samples
    group_size: int = flag(8, "[1, inf)")  # trajectories per rollout batch (2x rows with CFG)
    resolution: int = flag(0, models.RESOLUTION)  # image side in pixels; 0: 512 for SD3.5, 64 for tiny
    guidance_scale: float = flag(4.5, "[1, 100]")  # CFG scale in rollouts and training; 1: no CFG
    mixed_precision: str = flag("auto", models.MIXED_PRECISION)  # auto: fp16 on CUDA, none on CPU
    train_batch: int = flag(8, "[1, inf)")  # transitions per forward-backward when training
    repeats: int = flag(3, "[1, inf)")  # timed runs per measurement (the median is reported)
    warmup: int = flag(1, "[0, inf)")  # untimed runs before each (allocator, kernel choice)
    device: str = flag("", cli.DEVICE)  # "" = cuda:0 if CUDA is there, else cpu
    seed: int = flag(0, "[0, 1e18]")  # seeds the noise, the LoRA and the advantages
    trainer: bool = flag(False, (False, True))  # also run 2 iterations of each of TRAINER_ALGOS through sd35/train.py


LORA_RANK, LORA_ALPHA, DEFAULT_BETA = 32, 64, 0.004  # the trainer's defaults
TRAINER_ALGOS = ("flow_grpo", "stepwise", "superflow")
FLOW_GRPO = minflow.PRESETS["flow_grpo"]


def transformer_flops(config, resolution):
    """FLOPs of one transformer forward pass for ONE row (one image, one CFG branch) at `resolution`
    px, as torch's FlopCounterMode counts the matmuls and convolutions of a copy of the architecture
    run on the meta device (a [m, k] by [k, n] matmul counts 2 m n k; docs/sd35.md writes the sum
    out). Left out: what is not a matmul (norms, activations, softmax, the CFG sum), the LoRA
    adapters (the copy has none), the VAE and the text encoders."""
    transformer = models.build_parts({"transformer": config}, "meta", torch.float32)["transformer"]
    with FlopCounterMode(display=False) as counter:
        models.meta_forward(transformer, resolution, 1, torch.float32)
    return counter.get_total_flops()


@torch.no_grad()
def peak_matmul_flops(device, dtype):
    """This device's matmul FLOP/s in `dtype` (float32 on CPU) from repeated n^3 matmuls."""
    dtype = dtype if device.type == "cuda" else torch.float32
    n, reps = (8192, 20) if device.type == "cuda" else (1024, 5)
    a, b = (torch.randn(n, n, device=device, dtype=dtype) for _ in range(2))
    a @ b  # the first call selects kernels and warms the allocator
    watch = Stopwatch(device)
    for _ in range(reps):
        a @ b
    return 2 * n**3 * reps / watch.lap("matmul"), f"{n}^3 {str(dtype)[6:]} matmul"


class Stopwatch:
    """Seconds per named lap (laps of one name add up); synchronises CUDA, which runs async."""

    def __init__(self, device):
        self.device, self.seconds = device, {}
        self.last = self.now()

    def now(self):
        if self.device.type == "cuda":
            torch.cuda.synchronize(self.device)
        return time.perf_counter()

    def lap(self, name):
        now = self.now()
        self.seconds[name], self.last = self.seconds.get(name, 0.0) + now - self.last, now
        return self.seconds[name]


def measure(run, s, device):
    """`run(watch)`, which laps a Stopwatch, s.warmup times, then s.repeats times timed -> (median
    seconds by lap and "total", CUDA peak bytes or None, the last result)."""
    for _ in range(s.warmup):
        run(Stopwatch(device))
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    laps = []
    for _ in range(s.repeats):
        result = run(watch := Stopwatch(device))
        laps.append({**watch.seconds, "total": sum(watch.seconds.values())})
    peak = torch.cuda.max_memory_allocated(device) if device.type == "cuda" else None
    return {k: statistics.median(lap[k] for lap in laps) for k in laps[0]}, peak, result


def print_table(title, header, rows):
    widths = [max(len(str(row[i])) for row in [header, *rows]) for i in range(len(header))]
    lines = [[str(c).rjust(w) if i else str(c).ljust(w) for i, (c, w) in enumerate(zip(row, widths))]
             for row in [header, ["-" * w for w in widths], *rows]]
    print(f"\n{title}\n" + "\n".join("  ".join(line) for line in lines))


class Bench:
    """The run's fixed parts (LoRA'd model, optimiser, a group's prompt embeddings) and one method per
    kind of measurement."""

    def __init__(self, s, amp, device):
        self.s, self.dtype, self.device = s, amp or torch.float32, torch.device(device)
        self.autocast = (lambda: torch.autocast(self.device.type, dtype=amp)) if amp else None
        torch.manual_seed(s.seed)  # the LoRA's A matrices
        watch = Stopwatch(self.device)
        pipe = models.load_pipeline(s.model, self.dtype, self.device)
        watch.lap("build")
        prompts = load_prompts("general")[0]
        texts = [prompts[i % len(prompts)][0] for i in range(s.group_size)]
        self.cond = policy.encode_prompts(pipe, texts, s.guidance_scale, device)
        watch.lap("encode")
        self.seconds, self.transformer, self.vae = watch.seconds, pipe.transformer, pipe.vae
        self.scheduler = pipe.scheduler
        del pipe  # and with it the text encoders
        self.opt = torch.optim.AdamW(policy.add_lora(self.transformer, LORA_RANK, LORA_ALPHA))
        self.velocity = policy.guided_velocity(self.transformer, self.cond, s.guidance_scale,
                                               self.dtype, None, self.autocast)

    def rollout(self, resolution):
        """Sample and decode a group -> result: the trajectory."""
        side, sigmas = resolution // 8, policy.sigma_grid(self.scheduler, self.s.num_steps)
        noise = torch.randn((self.s.group_size, self.transformer.config.in_channels, side, side),
                            generator=torch.Generator().manual_seed(self.s.seed)).to(self.device)

        def once(watch):
            generator = torch.Generator(self.device).manual_seed(self.s.seed)
            traj = minflow.rollout(self.velocity, noise, sigmas, "flow_grpo", FLOW_GRPO.noise_level, generator)
            watch.lap("sample")
            policy.decode(self.vae, traj.xs[:, -1])
            watch.lap("decode")
            return traj

        return measure(once, self.s, self.device)

    def train(self, traj, beta, checkpointing):
        """Forward + backward of minflow.policy_loss on a micro-batch of --train_batch of the
        rollout's trained transitions (repeated if fewer; random +-1 advantages), then one
        AdamW step inside the same memory window -> (seconds per micro-batch, peak bytes)."""
        mask = minflow.trained_steps(traj.stds).expand(traj.xs.shape[0], -1)
        signs = torch.randint(2, mask.shape, generator=torch.Generator().manual_seed(self.s.seed))
        rows = minflow.transitions(traj, signs * 2.0 - 1, mask)
        idx = torch.arange(self.s.train_batch) % len(rows["advantage"])
        batch = {k: v[idx].to(self.device) for k, v in rows.items() if k != "sample"}
        velocity = policy.guided_velocity(self.transformer, self.cond.select(rows["sample"][idx]),
                                          self.s.guidance_scale, self.dtype, None, self.autocast)
        ref_velocity = policy.reference_velocity(self.transformer, velocity)

        def once(watch):
            minflow.policy_loss(velocity, batch, FLOW_GRPO, 1e-4, beta, ref_velocity)[0].backward()
            watch.lap("train")

        if checkpointing:
            self.transformer.enable_gradient_checkpointing()
        seconds, peak, _ = measure(once, self.s, self.device)
        self.opt.step()  # its state joins the peak, read again while the window is open
        peak = torch.cuda.max_memory_allocated(self.device) if peak is not None else None
        self.opt.zero_grad(set_to_none=True)
        self.transformer.disable_gradient_checkpointing()
        return seconds["total"], peak


def report_speed(bench, out, resolution):
    """Rollout and training: seconds, rate, MFU against this device's matmul peak, memory."""
    s, B = bench.s, bench.s.group_size
    seconds, peak, traj = bench.rollout(resolution)
    rows = 2 if s.guidance_scale > 1 else 1  # CFG: two rows an image
    flops = rows * transformer_flops(bench.transformer.config, resolution)
    matmul, how = peak_matmul_flops(bench.device, bench.dtype)
    out.update(rollout=seconds, peak_matmul_flops=matmul, rollout_images_per_s=B / seconds["total"])
    # Training counts 3 forwards (the usual convention; frozen base weights make it nearer 2),
    # the reference policy one more; checkpointing's recomputation is not counted.
    measured = [("rollout, sampling", seconds["sample"], B, "images", s.num_steps * B * flops, peak)]
    for checkpointing in ("off", "on"):
        for beta in (0.0, DEFAULT_BETA):
            sec, mem = bench.train(traj, beta, checkpointing == "on")
            out[f"train_checkpointing={checkpointing}_beta={beta:g}"] = sec
            work = (3 + (beta > 0)) * s.train_batch * flops
            measured.append((f"training, checkpointing {checkpointing}, beta {beta:g}", sec,
                             s.train_batch, "transitions", work, mem))
    out["mfu"] = {name: work / sec / matmul for name, sec, _, _, work, _ in measured}
    print_table(f"Speed: a rollout of {B} ({s.num_steps} steps, then {seconds['decode']:.3f} s "
                f"decoding), training micro-batches of {s.train_batch}; MFU against "
                f"{matmul / 1e12:.3f} TFLOP/s ({how})",
                ["measurement", "s", "rate", "TFLOP/s", "MFU", "peak memory"],
                [[name, f"{sec:.3f}", f"{n / sec:.2f} {unit}/s", f"{work / sec / 1e12:.4f}",
                  f"{100 * work / sec / matmul:.2f} %", "n/a (CPU)" if mem is None else models.size(mem)]
                 for name, sec, n, unit, work, mem in measured])


def report_workers(out):
    """One OCR scoring worker: the seconds from its start to its first score, and its resident memory."""
    start, workers = time.perf_counter(), ScoringWorkers(["ocr"], 1)
    workers.submit("ocr", np.full((1, 64, 64, 3), 255, np.uint8), ['"x"'], [{}]).result()
    seconds, status = time.perf_counter() - start, Path(f"/proc/{workers.processes[0].pid}/status")
    resident = int(re.search(r"VmRSS:\s+(\d+) kB", status.read_text()).group(1)) * 1024 if status.exists() else None
    workers.close()
    out.update(worker_start_s=seconds, worker_resident_bytes=resident)
    print_table("Scoring workers (--reward_workers, each a process of its own)", ["worker", "start to first score, s",
                "resident memory"], [["OCR", f"{seconds:.2f}", "n/a" if resident is None else models.size(resident)]])


def report_trainer(s, dtype, resolution, out):
    """Two iterations of each of TRAINER_ALGOS through sd35/train.py at the bench's sizes (a group
    of --group_size, JPEG rewards): the second iteration's seconds (the first warms up), from its
    log, and the peak accelerator memory against the trainer's start-up estimate."""
    flags = [f"--model={s.model}", f"--resolution={resolution}", f"--mixed_precision={s.mixed_precision}",
             f"--device={s.device}", f"--seed={s.seed}", f"--num_steps={s.num_steps}", f"--group_size={s.group_size}",
             f"--guidance_scale={s.guidance_scale}", f"--train_batch={s.train_batch}", f"--sample_batch={s.group_size}",
             "--prompts_per_iter=1", "--reward=jpeg_compressibility", "--prompts=general", "--iters=2",
             "--eval_every=0", "--save_every=0", "--eval_images=1", "--eval_num_steps=2"]
    plan = models.MemoryPlan(resolution, s.train_batch, LORA_RANK, False, s.group_size, s.num_steps, s.group_size)
    estimate, rows = sum(b for _, b in models.memory_estimate(s.model, dtype, plan) or []), []
    with tempfile.TemporaryDirectory() as folder:
        for algo in TRAINER_ALGOS:
            run = subprocess.run([sys.executable, str(Path(__file__).with_name("train.py")), *flags, f"--algo={algo}",
                                  f"--out={folder}/{algo}"], capture_output=True, text=True)
            if run.returncode != 0:
                sys.exit(f"error: sd35/train.py --algo={algo} failed: {(run.stderr.strip().splitlines() or [''])[-1]}")
            last = [e for e in read_log(Path(folder) / algo / "log.jsonl") if "iteration" in e][-1]
            seconds, peak = [last[f"seconds_{part}"] for part in ("sampling", "reward", "training")], \
                last.get("peak_memory_bytes")
            out[f"trainer_{algo}"] = {"seconds": sum(seconds), "peak_memory_bytes": peak}
            rows.append([algo, f"{sum(seconds):.2f}", *(f"{t:.2f}" for t in seconds),
                         "n/a (CPU)" if peak is None else models.size(peak), models.size(estimate)])
    print_table(f"sd35/train.py, the second of 2 iterations: {s.group_size} trajectories of {s.num_steps} steps",
                ["algorithm", "s/iteration", "sampling", "reward", "training", "peak memory", "estimated"], rows)


def main(argv):
    """Run every measurement and print its table -> the numbers, for tests."""
    try:
        s = cli.read_flags(Settings, argv)
        device = models.choose_device(s.device, torch.cuda.device_count())
        amp = models.autocast_dtype(s.mixed_precision, device)
        resolution, _ = models.resolution(s.model, s.resolution)
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    # The tiny tokenizers are per character, so CLIP truncates prompts on every call and the
    # libraries would warn each time; their verbosity is restored on the way out.
    libraries = (diffusers_logging, transformers_logging)
    verbosity = [library.get_verbosity() for library in libraries]
    for library in libraries:
        library.set_verbosity_error()
    if device.type == "cuda":  # what allocates on the current device (kernels' workspaces) uses this one too
        torch.cuda.set_device(device)
    try:
        plan = models.MemoryPlan(resolution, s.train_batch, LORA_RANK, trajectories=s.group_size,
                                 num_steps=s.num_steps, decode_batch=s.group_size)
        rows = models.memory_estimate(s.model, amp or torch.float32, plan)
        print(models.format_memory_table(rows, torch.cuda.get_device_properties(device).total_memory
                                         if device.type == "cuda" else None))
        bench, out = Bench(s, amp, device), {}
        print(f"\n{s.model} on {device} ({str(bench.dtype)[6:]}), {resolution} px, CFG "
              f"{s.guidance_scale}; built in {bench.seconds['build']:.1f} s, prompts encoded in "
              f"{bench.seconds['encode']:.2f} s; median of {s.repeats} after {s.warmup} warmup")
        report_speed(bench, out, resolution)
        report_workers(out)
        if s.trainer:
            del bench  # its model and the memory it cached leave the device to the trainers
            torch.cuda.empty_cache()
            report_trainer(s, amp or torch.float32, resolution, out)
        return out
    finally:
        for library, level in zip(libraries, verbosity):
            library.set_verbosity(level)


if __name__ == "__main__":
    main(sys.argv[1:])
