"""Fine-tune Stable Diffusion 3.5 Medium with Flow-GRPO, Stepwise-Flow-GRPO or SuperFlow.

One file that runs alone or under torchrun, as nanoGPT's train.py does: torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK) switches DDP on, NCCL on GPUs and gloo on CPUs;
rank 0 logs, evaluates to disk and saves.

    python sd35/train.py --model=tiny --resolution=64 --iters=2     # CPU smoke run, no download
    python sd35/train.py --reward=ocr --prompts=ocr                  # one GPU, defaults below
    torchrun --nproc_per_node=8 sd35/train.py --algo=superflow --reward=pickscore --prompts=general
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --master_port=29500 --nproc_per_node=8 \\
        sd35/train.py --algo=stepwise --group_size=24 --prompts_per_iter=48   # node_rank=1 on the other
    python sd35/train.py --eval_only --resume=runs/sd35              # evaluate the newest checkpoint

`--algo` picks a preset; any field of minflow.Algorithm given as a flag overrides that axis
(`--algo=stepwise --group_sizes=variance`, `--sampler=cps --noise_level=0.8`). Every RL formula
lives in minflow.py; this file only feeds it images, rewards and gradients.
"""
import gc
import hashlib
import io
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
from einops import rearrange
from PIL import Image
from torch.nn.parallel import DistributedDataParallel as DDP
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import minflow  # noqa: E402
from sd35 import checkpoint, policy  # noqa: E402
from sd35.data import load_prompts  # noqa: E402
from sd35.rewards import RewardError, RewardMix, RewardOptions, parse_reward_spec  # noqa: E402


@dataclass
class Config:
    model: str = "stabilityai/stable-diffusion-3.5-medium"  # hub id, local diffusers folder, or "tiny" (built in code)
    algo: str = "flow_grpo"  # preset: flow_grpo, stepwise, superflow (axis flags override it)
    reward: str = "ocr"  # reward or weighted mix, e.g. ocr=0.8,pickscore=0.2 (sd35/rewards.py)
    reward_url: str = ""  # the reward server's URL, for the remote reward
    prompts: str = "ocr"  # shipped set (ocr, general) or a folder with train/test .txt or .jsonl
    group_size: int = 8  # G, trajectories per prompt (the mean size under variance-aware sizes); 24 in the paper
    prompts_per_iter: int = 8  # groups per iteration; samples per iteration = group_size x this, over all ranks
    num_steps: int = 10  # sampling steps in training
    eval_num_steps: int = 40  # ODE steps in evaluation
    guidance_scale: float = 4.5  # CFG in sampling and training; 1 switches CFG off
    resolution: int = 512  # image side in pixels; a multiple of 16 (VAE 8x, patch 2)
    iters: int = 300  # RL iterations
    minibatches: int = 2  # optimiser steps per iteration, each over a share of the transitions
    train_batch: int = 8  # transitions per forward-backward (gradients accumulate beyond it)
    sample_batch: int = 16  # trajectories per forward pass while sampling and decoding
    lr: float = 3e-4  # AdamW learning rate of the LoRA
    weight_decay: float = 1e-4  # AdamW weight decay
    grad_clip: float = 1.0  # gradient-norm clip
    clip_range: float = 1e-4  # PPO clip; tiny because log-probs average over 65k latent dims
    beta: float = 0.004  # KL weight; our KL is exact (divides by std^2), so 0.004 ~ the reference's 0.04 at dt ~ 0.1
    lora_rank: int = 32  # LoRA rank r
    lora_alpha: int = 64  # LoRA alpha (scale alpha / r)
    ema_decay: float = 0.9  # evaluate an EMA of the LoRA weights (Flow-GRPO's default); 0 evaluates the live weights
    ema_every: int = 8  # optimiser steps between EMA updates
    mixed_precision: str = "auto"  # fp16 (preferred: smaller log-prob mismatch), bf16, no; auto = fp16 on CUDA, no on CPU
    gradient_checkpointing: bool = False  # recompute activations in backward: less memory, about 30 % slower
    device: str = ""  # "" = cuda:LOCAL_RANK if CUDA is there, else cpu
    seed: int = 0  # seeds every random draw, per iteration and rank
    out: str = "runs/sd35"  # run folder: log.jsonl, eval/ grids, checkpoints/
    resume: str = ""  # a run folder (newest checkpoint in it) or a checkpoint folder to continue from
    eval_every: int = 20  # iterations between evaluations (0 = only at the end)
    eval_images: int = 16  # test prompts per evaluation (0 = all)
    save_every: int = 20  # iterations between checkpoints (and always at the end and on SIGINT/SIGTERM)
    eval_only: bool = False  # evaluate the loaded (or base) model once and exit
    max_bad_steps: int = 5  # stop after this many optimiser steps in a row with a NaN/inf gradient (each is skipped)
    reward_workers: int = cli.flag(-1, "[-1, 1024]")  # processes scoring OCR (rewards.CPU_BOUND); -1 = CPU cores per local rank, 0 = in this process


AXES = {f.name for f in fields(minflow.Algorithm)}


class RunError(RuntimeError):
    """Something at run time that training cannot go on from; the message is one line."""


def parse_args(argv, world_size):
    """Flags -> (cfg, algo, train prompts, test prompts); a ValueError (one line) for any bad
    input, before anything heavy is loaded."""
    axis_flags = [a for a in argv if a.removeprefix("--").partition("=")[0] in AXES]
    cfg = Config(**cli.parse_flags(Config, [a for a in argv if a not in axis_flags]))
    algo = cli.read_flags(minflow.Algorithm, axis_flags, base=minflow.make_algorithm(cfg.algo))
    if cfg.group_size < 2:
        raise ValueError(f"--group_size={cfg.group_size}: a group needs at least 2 samples to be normalised")
    budget = cfg.group_size * cfg.prompts_per_iter
    if cfg.prompts_per_iter < 1 or budget % world_size:
        raise ValueError(f"{budget} samples per iteration (group_size x prompts_per_iter) do not split over "
                         f"{world_size} ranks; expected a multiple of {world_size}")
    if cfg.resolution <= 0 or cfg.resolution % 16:
        raise ValueError(f"--resolution={cfg.resolution}: expected a positive multiple of 16 (VAE 8x, patch 2)")
    if cfg.mixed_precision not in ("auto", "fp16", "bf16", "no"):
        raise ValueError(f"--mixed_precision={cfg.mixed_precision!r}; expected auto, fp16, bf16 or no")
    if cfg.num_steps < 2 or cfg.eval_num_steps < 1 or cfg.iters < 0 or cfg.minibatches < 1 or cfg.train_batch < 1 \
            or not 0 <= cfg.ema_decay < 1 or cfg.ema_every < 1:
        raise ValueError("need num_steps >= 2, eval_num_steps >= 1, iters >= 0, minibatches >= 1, train_batch >= 1, "
                         "0 <= ema_decay < 1, ema_every >= 1")
    parse_reward_spec(cfg.reward)
    train_prompts, test_prompts = load_prompts(cfg.prompts)
    return cfg, algo, train_prompts, test_prompts


# ----------------------------------------------------------------------------------
# Ranks. Every rank computes the iteration's plan (prompts, group sizes, initial noise) from
# the same seeded generator, samples its contiguous share of the budget, and all-gathers the
# rewards. Advantages are then computed on the whole batch, identically on every rank, and
# each rank trains on its share. So a group is normalised whole even when it spans ranks or
# when SuperFlow makes group sizes uneven; normalising per rank would bias the baseline.


class Ranks:
    def __init__(self, device_flag):
        self.ddp = "RANK" in os.environ
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        cuda = torch.cuda.is_available() and not device_flag.startswith("cpu")
        if self.ddp:
            self.device = torch.device(f"cuda:{os.environ['LOCAL_RANK']}" if cuda else "cpu")
        else:
            self.device = torch.device(device_flag or ("cuda" if cuda else "cpu"))
        self.master = self.rank == 0

    def start(self):
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.ddp:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    def gather(self, local):
        """Concatenate every rank's tensor in rank order (CPU in, CPU out)."""
        if not self.ddp:
            return local
        local = local.to(self.device).contiguous()
        parts = [torch.empty_like(local) for _ in range(self.world)]
        dist.all_gather(parts, local)
        return torch.cat(parts).cpu()

    def share(self, total):
        """This rank's contiguous slice of `total` items."""
        per = total // self.world
        return slice(self.rank * per, (self.rank + 1) * per)


def generator(*key, device="cpu"):
    """A generator seeded by a tuple (seed, iteration, purpose, ...): random draws are a
    function of where they happen, so a resumed run repeats them exactly. (Not Python's
    hash(), which differs between processes, so ranks would disagree.)"""
    return torch.Generator(device).manual_seed(int(hashlib.sha256(repr(key).encode()).hexdigest()[:15], 16))


# ----------------------------------------------------------------------------------
# One iteration: sample, score, credit, update


def sample_and_score(it, cfg, algo, pipe, model_dtype, autocast, reward, prompts, tracker, ranks):
    """Roll out this rank's share of the iteration's groups; score them (and every
    intermediate state for gains); return the local trajectories, conditioning and the
    advantages [b, T], plus logs."""
    timer, logs = time.perf_counter(), {}
    plan = generator(cfg.seed, it, "plan")
    K, budget = cfg.prompts_per_iter, cfg.group_size * cfg.prompts_per_iter
    prompt_ids = minflow.choose_prompts(algo, len(prompts), K, tracker, plan)
    sizes = minflow.group_sizes(algo, K, budget, tracker, prompt_ids)
    group_ids = torch.repeat_interleave(torch.arange(K), sizes)
    latent = cfg.resolution // 8
    noise = minflow.initial_noise(sizes, (pipe.transformer.config.in_channels, latent, latent), algo.shared_noise, plan)
    mine = ranks.share(budget)
    local_prompts = [prompts[i] for i in prompt_ids[group_ids[mine]].tolist()]
    texts, metadata = [p for p, _ in local_prompts], [m for _, m in local_prompts]

    cond = policy.encode_prompts(pipe, texts, cfg.guidance_scale, ranks.device)
    velocity = policy.guided_velocity(pipe.transformer, cond, cfg.guidance_scale, model_dtype, cfg.sample_batch, autocast)

    def velocity_of(rows):  # the velocity for rows of these trajectories (a pass mixes states)
        return policy.guided_velocity(pipe.transformer, cond.select(rows), cfg.guidance_scale, model_dtype,
                                      cfg.sample_batch, autocast)
    sigmas = minflow.sd3_sigmas(cfg.num_steps)
    traj = minflow.rollout(velocity, noise[mine].to(ranks.device), sigmas, algo.sampler, algo.noise_level,
                           generator(cfg.seed, it, "sde", ranks.rank, device=ranks.device))
    logs["seconds_sampling"] = time.perf_counter() - timer

    timer = time.perf_counter()

    def score(latents, rows, total_only=False):
        """Decode here (on the device), then score: CPU-bound rewards run in the worker pool
        while this process goes on to the next chunk's clean estimates."""
        rows = rows.tolist()
        return reward.submit(policy.decode(pipe.vae, latents, cfg.sample_batch), [texts[i] for i in rows],
                             [metadata[i] for i in rows], total_only)

    # A reward that fails on one rank must stop every rank, not leave the others waiting in
    # the gather below: each rank reports whether it failed, and all stop together.
    failure, step_rewards = None, None
    try:
        final = score(traj.xs[:, -1], torch.arange(len(texts)))
        if algo.step_credit == "gains":
            # Only the states next to a trained step, r_0 once per group with shared noise, in
            # passes of sample_batch rows; the final rewards are scored meanwhile.
            groups = group_ids[mine] if algo.shared_noise else None
            step_rewards = minflow.step_rewards(
                lambda x, t, rows: velocity_of(rows)(x, t), traj, lambda x0, rows: score(x0, rows, total_only=True),
                algo.substeps, needed=minflow.needed_states(traj.stds), groups=groups, batch_size=cfg.sample_batch)
        local_rewards, terms = final.result()
        if step_rewards is not None:
            step_rewards[:, -1] = local_rewards
    except RewardError as error:
        failure = str(error)
    failed = ranks.gather(torch.tensor([failure is not None]))
    if failed.any():
        raise RunError(failure or f"a reward failed on rank {int(failed.nonzero()[0])}; its output says which")
    rewards = ranks.gather(local_rewards.float().cpu())
    step_rewards = None if step_rewards is None else ranks.gather(step_rewards)
    if not torch.equal(ranks.gather(prompt_ids[group_ids[mine]]), prompt_ids[group_ids]):
        raise RunError("ranks disagree on the iteration's prompts; check that every rank runs the same flags")
    logs["seconds_reward"] = time.perf_counter() - timer

    # Samples with a NaN or infinite reward are dropped (advantage 0, not in any statistic).
    # Step rewards are NaN at the states no trained gain needs (minflow.needed_states).
    used = None if step_rewards is None else step_rewards[:, minflow.needed_states(traj.stds)]
    valid = torch.isfinite(rewards) & (True if used is None else torch.isfinite(used).all(1))
    if not valid.any():
        raise RunError(f"iteration {it + 1}: every reward is NaN or infinite; check the reward function")
    keep = (lambda x: None if x is None else x[valid])
    ids = prompt_ids[group_ids][valid]
    baseline = tracker.baseline(ids) if algo.baseline == "tracker" else None
    adv = torch.zeros(budget, len(traj.stds))
    adv[valid] = minflow.advantages(algo, rewards[valid], group_ids[valid], traj.stds, keep(step_rewards), baseline)
    if tracker is not None:
        tracker.update(ids, rewards[valid])
    terms = {k: ranks.gather(v.float().cpu()) for k, v in terms.items()}
    logs.update({"reward_mean": rewards[valid].mean().item(), "reward_std": rewards[valid].std(unbiased=False).item(),
                 "dropped_samples": int((~valid).sum()), "zero_std_ratio": minflow.zero_std_fraction(rewards[valid], group_ids[valid]),
                 "group_sizes": sizes.tolist(), **{f"reward_{k}": v[v.isfinite()].mean().item() for k, v in terms.items()}})
    return traj, cond, adv[mine], logs


def optimise(it, cfg, algo, model, transformer, params, traj, cond, adv, opt, scaler, model_dtype, autocast, ranks):
    """The PPO update of one iteration: cfg.minibatches optimiser steps over this rank's
    informative transitions. Every rank runs the same number of forward-backward passes (DDP
    needs that); short ranks pad with rows of weight 0. Each real row weighs world / N, N the
    step's rows over all ranks, so DDP's gradient average equals one big batch's mean."""
    trained = minflow.trained_steps(traj.stds)
    rows = minflow.transitions(traj, adv, trained.expand_as(adv))
    shuffle = generator(cfg.seed, it, "shuffle", ranks.rank)
    informative = (rows["advantage"] != 0).nonzero()[:, 0]
    informative = informative[torch.randperm(len(informative), generator=shuffle)]
    padding = torch.randperm(len(rows["advantage"]), generator=shuffle)
    stats, grad_norms, sync = [], [], nullcontext if not ranks.ddp else model.no_sync
    for step_rows in informative.tensor_split(cfg.minibatches):
        counts = ranks.gather(torch.tensor([len(step_rows)]))
        if counts.sum() == 0:
            continue
        passes = math.ceil(int(counts.max()) / cfg.train_batch)
        fill = passes * cfg.train_batch - len(step_rows)
        order = torch.cat([step_rows, padding.repeat(fill // len(padding) + 1)[:fill]])
        weight = torch.zeros(len(order))
        weight[:len(step_rows)] = ranks.world / counts.sum()
        for p in range(passes):
            idx, w = order[p * cfg.train_batch:(p + 1) * cfg.train_batch], weight[p * cfg.train_batch:(p + 1) * cfg.train_batch]
            step_cond = cond.select(rows["sample"][idx])
            velocity = policy.guided_velocity(model, step_cond, cfg.guidance_scale, model_dtype, None, autocast)
            reference = policy.guided_velocity(transformer, step_cond, cfg.guidance_scale, model_dtype, None, autocast)

            def ref_velocity(x, t):
                with policy.adapter_disabled(transformer):
                    return reference(x, t)

            dev = ranks.device
            with sync() if p < passes - 1 else nullcontext():
                loss, s = minflow.policy_loss(
                    velocity, rows["x"][idx].to(dev), rows["x_next"][idx].to(dev), rows["t"][idx].to(dev),
                    rows["t_next"][idx].to(dev), rows["old_log_prob"][idx].to(dev), rows["advantage"][idx].to(dev),
                    algo.sampler, algo.noise_level, cfg.clip_range, cfg.beta, ref_velocity, weight=w.to(dev))
                scaler.scale(loss).backward()
            if w.any():
                stats.append({**s, "policy_loss": loss.item()})
        scaler.unscale_(opt)
        grad_norm = torch.nn.utils.clip_grad_norm_(params, cfg.grad_clip)
        if torch.isfinite(grad_norm):  # a NaN/inf loss or gradient: skip the step (all ranks agree)
            scaler.step(opt)
        scaler.update()
        opt.zero_grad(set_to_none=True)
        grad_norms.append(grad_norm.item())
    logs = {key: sum(s[key] for s in stats) / len(stats) for key in (stats[0] if stats else {})}
    finite = [g for g in grad_norms if math.isfinite(g)]
    return {**logs, "grad_norm": max(finite, default=0.0), "optimiser_steps": len(grad_norms),
            "skipped_steps": [not math.isfinite(g) for g in grad_norms]}


@torch.no_grad()
def evaluate(it, cfg, pipe, model_dtype, autocast, reward, test_prompts, ranks, out):
    """ODE samples of the test prompts from fixed noise: mean reward per term, and a grid PNG."""
    chosen = test_prompts[:cfg.eval_images or len(test_prompts)]
    per_rank = math.ceil(len(chosen) / ranks.world)
    padded = (chosen * ranks.world)[:per_rank * ranks.world]  # every rank scores the same number
    mine = padded[ranks.rank * per_rank:(ranks.rank + 1) * per_rank]
    texts, metadata = [p for p, _ in mine], [m for _, m in mine]
    latent = cfg.resolution // 8
    noise = torch.randn((len(padded), pipe.transformer.config.in_channels, latent, latent), generator=generator(cfg.seed, "eval"))
    cond = policy.encode_prompts(pipe, texts, cfg.guidance_scale, ranks.device)
    velocity = policy.guided_velocity(pipe.transformer, cond, cfg.guidance_scale, model_dtype, cfg.sample_batch, autocast)
    traj = minflow.rollout(velocity, noise[ranks.share(len(padded))].to(ranks.device), minflow.sd3_sigmas(cfg.eval_num_steps), "ode")
    images = policy.decode(pipe.vae, traj.xs[:, -1], cfg.sample_batch)
    total, terms = reward(images, texts, metadata)
    logs = {"eval_reward": ranks.gather(total.float().cpu())[:len(chosen)].mean().item(),
            **{f"eval_reward_{k}": ranks.gather(v.float().cpu())[:len(chosen)].mean().item() for k, v in terms.items()}}
    grid = ranks.gather((images * 255).round().to(torch.uint8).cpu())[:len(chosen)]
    if ranks.master:
        cols = math.ceil(math.sqrt(len(grid)))
        grid = torch.cat([grid, torch.zeros((cols * math.ceil(len(grid) / cols) - len(grid), *grid.shape[1:]), dtype=torch.uint8)])
        (out / "eval").mkdir(exist_ok=True)
        png = io.BytesIO()
        Image.fromarray(rearrange(grid, "(r c) ch h w -> (r h) (c w) ch", c=cols).numpy()).save(png, format="PNG")
        cli.atomic_write(out / "eval" / f"iter_{it:06d}.png", png.getvalue())
    return logs


# ----------------------------------------------------------------------------------


def main(argv):
    ranks = Ranks(next((a.partition("=")[2] for a in argv if a.startswith("--device=")), ""))
    try:  # every check that needs no model weights, before any load
        cfg, algo, train_prompts, test_prompts = parse_args(argv, ranks.world)
        identity = {"model": cfg.model, "lora_rank": cfg.lora_rank, "algorithm": asdict(algo)}
        out = Path(cfg.out)
        # A folder with a checkpoint holds a run to continue, not to overwrite. (A log alone is
        # a run killed before its first save: starting afresh replays exactly what it lost.)
        if not cfg.resume and not cfg.eval_only and checkpoint.newest(out):
            raise ValueError(f"--out={out} already holds a run; pass --resume={out} to continue it, or another --out")
        resume_from = checkpoint.newest(cfg.resume) if cfg.resume else None
        if cfg.resume and resume_from is None:
            raise ValueError(f"--resume={cfg.resume}: no complete checkpoint there")
        if resume_from:
            checkpoint.check_identity(resume_from, identity)
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{ranks.rank}"
        probe.write_bytes(b"")
        probe.unlink()
        config = policy.transformer_config(cfg.model)
        side = cfg.resolution // 8 // config["patch_size"]
        if side > config["pos_embed_max_size"]:
            raise ValueError(f"--resolution={cfg.resolution} needs {side} patches a side; this model takes at most "
                             f"{config['pos_embed_max_size']} ({config['pos_embed_max_size'] * 8 * config['patch_size']} px)")
    except (ValueError, OSError) as e:
        sys.exit(f"error: {e}")
    ranks.start()
    torch.manual_seed(cfg.seed)  # only the LoRA's initial weights draw from the global generator

    precision = cfg.mixed_precision if cfg.mixed_precision != "auto" else ("fp16" if ranks.device.type == "cuda" else "no")
    model_dtype = {"fp16": torch.float16, "bf16": torch.bfloat16, "no": torch.float32}[precision]
    autocast = (lambda: torch.autocast(ranks.device.type, dtype=model_dtype)) if precision != "no" else None
    workers = cfg.reward_workers if cfg.reward_workers >= 0 else \
        max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    reward = RewardMix(cfg.reward, RewardOptions(device=str(ranks.device), remote_url=cfg.reward_url or None), workers)
    pipe = policy.load_pipeline(cfg.model, model_dtype, ranks.device)
    transformer = pipe.transformer
    params = policy.add_lora(transformer, cfg.lora_rank, cfg.lora_alpha)
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    opt = torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay)
    scaler = torch.amp.GradScaler(ranks.device.type, enabled=precision == "fp16")
    tracker = minflow.new_tracker(algo, len(train_prompts), reward_range=None)
    ema = policy.LoraEMA(params, cfg.ema_decay, cfg.ema_every) if cfg.ema_decay > 0 else None
    start = checkpoint.load(resume_from, transformer, opt, scaler, tracker, ema, identity) if resume_from else 0
    model = DDP(transformer, device_ids=[ranks.device.index] if ranks.device.type == "cuda" else None) if ranks.ddp else transformer

    budget = cfg.group_size * cfg.prompts_per_iter
    sigmas = minflow.sd3_sigmas(cfg.num_steps)
    trained = int(minflow.trained_steps(minflow.step_std(sigmas[:-1], sigmas[1:], algo.sampler, algo.noise_level)).sum())
    if ranks.master:
        print(f"batch: {ranks.world} rank(s) x {budget // ranks.world} samples = {budget} per iteration "
              f"({cfg.prompts_per_iter} prompts x {'mean ' if algo.group_sizes != 'fixed' else ''}{cfg.group_size}); "
              f"{trained} of {cfg.num_steps} steps trained -> up to {budget * trained} transitions per iteration in "
              f"{cfg.minibatches} optimiser steps of micro-batches of {cfg.train_batch}; "
              f"{len(train_prompts)} train / {len(test_prompts)} test prompts; {precision}; "
              f"{sum(p.numel() for p in params) / 1e6:.2f}M LoRA parameters; from iteration {start}")
        print(f"algorithm: {algo}")

    log_path = out / "log.jsonl"
    if ranks.master and log_path.exists() and not cfg.eval_only:  # after the checks above: nothing durable is lost
        # Keep the lines up to the checkpoint we continue from; a line torn by a kill is dropped.
        kept = [e for e in read_log(log_path) if e.get("iteration", 0) <= start]
        cli.atomic_write(log_path, "".join(json.dumps(e) + "\n" for e in kept).encode())

    def log(entry):
        if ranks.master:
            with open(log_path, "a") as f:
                f.write(json.dumps(entry) + "\n")
                f.flush()
                os.fsync(f.fileno())

    def save(it):
        if ranks.master:
            checkpoint.save(out, it, transformer, opt, scaler, tracker, ema, identity)
        if ranks.ddp:
            dist.barrier()

    def evaluated(it):
        with ema.applied() if ema else nullcontext():
            return evaluate(it, cfg, pipe, model_dtype, autocast, reward, test_prompts, ranks, out)

    if cfg.eval_only:
        log({"iteration": start, **evaluated(start)})
    stop = {"signal": 0}
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.update(signal=signum))
    progress = tqdm(range(start, cfg.iters if not cfg.eval_only else start), disable=not ranks.master, desc="RL iterations")
    saved, bad_steps = start, 0

    def fail(error, completed):
        """Stop the run after saving the `completed` iterations not yet in a checkpoint."""
        if completed > saved:
            save(completed)
        if ranks.master:
            print(f"error: {error} (newest checkpoint: iteration {max(completed, saved)})", file=sys.stderr)
        sys.exit(1)

    for it in progress:
        try:  # a RunError from sampling and scoring comes before the iteration changes any state
            traj, cond, adv, logs = sample_and_score(it, cfg, algo, pipe, model_dtype, autocast, reward, train_prompts, tracker, ranks)
        except RunError as error:
            fail(error, it)
        timer = time.perf_counter()
        logs.update(optimise(it, cfg, algo, model, transformer, params, traj, cond, adv, opt, scaler, model_dtype, autocast, ranks))
        logs["seconds_training"] = time.perf_counter() - timer
        for skipped in logs["skipped_steps"]:
            if ema and not skipped:
                ema.step()
            bad_steps = bad_steps + 1 if skipped else 0
            if bad_steps >= cfg.max_bad_steps:
                break
        done = it + 1
        if (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.iters:
            logs.update(evaluated(done))
        log({"iteration": done, **logs})
        progress.set_postfix(reward=f"{logs['reward_mean']:.3f}", ratio=f"{logs.get('ratio', 1):.4f}")
        if bad_steps >= cfg.max_bad_steps:  # the iteration ran (its updates skipped): it counts as done
            fail(RunError(f"{bad_steps} optimiser steps in a row had a NaN or infinite gradient (all skipped); "
                          f"lower --lr, or check the rewards and --mixed_precision"), done)
        interrupted = ranks.gather(torch.tensor([stop["signal"]]))  # every rank stops together
        if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.iters or interrupted.any():
            save(done)
            saved = done
        if interrupted.any():
            if ranks.master:
                print(f"stopped by signal {int(interrupted.max())} after iteration {done}; checkpoint saved")
            break
    if ranks.ddp:
        in_sync = ranks_in_sync(params, ranks)
        if ranks.master:
            log({"ranks_in_sync": in_sync})
        # Free DDP while the process group is still registered. Otherwise DDP's Reducer is the
        # group's last owner and destroys it while holding the GIL, which can deadlock with
        # gloo's worker thread (pytorch/pytorch#56297); destroy_process_group releases it.
        del model
        gc.collect()
        dist.destroy_process_group()


def read_log(path):
    """The log's entries, skipping a last line torn by a kill (a JSONL line is complete only
    with its newline)."""
    entries = []
    for line in Path(path).read_text(errors="replace").split("\n")[:-1]:
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


def ranks_in_sync(params, ranks):
    """Whether every rank ends with bitwise the same LoRA weights (DDP's promise, checked)."""
    flat = torch.cat([p.detach().float().flatten().cpu() for p in params])
    return bool((ranks.gather(flat[None]) == flat).all())


if __name__ == "__main__":
    main(sys.argv[1:])
