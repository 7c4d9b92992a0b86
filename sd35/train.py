"""Fine-tune Stable Diffusion 3.5 Medium with Flow-GRPO, Stepwise-Flow-GRPO or SuperFlow.

One file that runs alone or under torchrun, as nanoGPT's train.py does: torchrun's
environment (RANK, WORLD_SIZE, LOCAL_RANK) switches DDP on, NCCL on GPUs and gloo on CPUs;
rank 0 logs, evaluates to disk and saves.

    python sd35/train.py --model=tiny --iters=2                      # CPU smoke run at 64 px, no download
    python sd35/train.py --reward=ocr --prompts=ocr                  # one GPU, defaults below
    torchrun --nproc_per_node=8 sd35/train.py --algo=superflow --reward=pickscore --prompts=general
    torchrun --nnodes=2 --node_rank=0 --master_addr=HOST --master_port=29500 --nproc_per_node=8 \\
        sd35/train.py --algo=stepwise --group_size=24 --prompts_per_iter=48   # node_rank=1 on the other
    python sd35/train.py --iters=600 --resume                        # continue the run in --out
    python sd35/train.py --eval_only --resume=runs/sd35              # evaluate the newest checkpoint

`--algo` picks a preset; any field of minflow.Algorithm given as a flag overrides that axis
(`--algo=stepwise --group_sizes=bins`, `--sampler=cps --noise_level=0.8`). Every RL formula
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
from cli import flag, parses, text_range  # noqa: E402
from sd35 import checkpoint, curves, policy  # noqa: E402
from sd35.curves import read_log  # noqa: E402
from sd35.data import SHIPPED_SETS, load_prompts  # noqa: E402
from sd35.rewards import REWARDS, RewardError, RewardMix, RewardOptions, parse_reward_spec, reward_range  # noqa: E402


# The ranges of Config's text flags and of --resolution, named so that each field fits on its line.
MODEL = text_range("a hub id, a local diffusers folder, or tiny")
PRESET = text_range(f"a preset ({', '.join(minflow.PRESETS)}), optionally with :axis=value overrides",
                    parses(minflow.make_algorithm))
REWARD_SPEC = text_range(f"rewards from {', '.join(sorted(REWARDS))} with optional weights, e.g. ocr=0.8,pickscore=0.2",
                         parses(parse_reward_spec))
URL = text_range("empty or an http(s):// URL", lambda v: v == "" or v.startswith(("http://", "https://")))
PROMPT_SET = text_range(f"a shipped set ({', '.join(SHIPPED_SETS)}) or a folder",
                        lambda v: v in SHIPPED_SETS or (v != "" and Path(v).is_dir()))


def resolution_range(value):
    if value is None or value < 0 or value % 16:
        return "0 (the model's own default) or a positive multiple of 16 (VAE 8x, patch 2)"
    return None


@dataclass
class Config:
    model: str = flag("stabilityai/stable-diffusion-3.5-medium", MODEL)  # or a local diffusers folder; "tiny" is built in code
    algo: str = flag("flow_grpo", PRESET)  # flow_grpo, stepwise, superflow, ...; axis flags such as --sampler override it
    reward: str = flag("ocr", REWARD_SPEC)  # one reward or a weighted mix, e.g. ocr=0.8,pickscore=0.2 (sd35/rewards.py)
    reward_url: str = flag("", URL)  # the reward server, for --reward=remote
    prompts: str = flag("ocr", PROMPT_SET)  # shipped set (ocr, general) or a folder with train/test .txt or .jsonl
    group_size: int = flag(8, "[2, inf)")  # G, trajectories per prompt (the mean size under variance-aware sizes); 24 in the paper
    prompts_per_iter: int = flag(8, "[1, inf)")  # groups per iteration; samples per iteration = group_size x this, over all ranks
    num_steps: int = flag(10, "[2, inf)")  # sampling steps in training
    eval_num_steps: int = flag(40, "[1, inf)")  # ODE steps in evaluation
    guidance_scale: float = flag(4.5, "[1, 100]")  # CFG in sampling and training; 1 switches CFG off
    resolution: int = flag(0, resolution_range)  # image side in pixels; 0 = the model's own (512 for SD3.5, 64 for tiny)
    iters: int = flag(300, "[0, inf)")  # RL iterations
    minibatches: int = flag(2, "[1, inf)")  # optimiser steps per iteration, each over a share of the transitions
    train_batch: int = flag(8, "[1, inf)")  # transitions per forward-backward (gradients accumulate beyond it)
    sample_batch: int = flag(16, "[1, inf)")  # trajectories per forward pass while sampling and decoding
    lr: float = flag(3e-4, "(0, 1]")  # AdamW learning rate of the LoRA
    weight_decay: float = flag(1e-4, "[0, 1]")  # AdamW weight decay
    grad_clip: float = flag(1.0, "(0, inf)")  # gradient-norm clip
    clip_range: float = flag(1e-4, "(0, 1)")  # PPO clip; tiny because log-probs average over 65k latent dims
    beta: float = flag(0.004, "[0, inf)")  # KL weight; our KL is exact (divides by std^2), so 0.004 ~ the reference's 0.04 at dt ~ 0.1
    lora_rank: int = flag(32, "[1, inf)")  # LoRA rank r
    lora_alpha: int = flag(64, "[1, inf)")  # LoRA alpha (scale alpha / r)
    ema_decay: float = flag(0.9, "[0, 1)")  # evaluate an EMA of the LoRA weights (Flow-GRPO's default); 0 evaluates the live weights
    ema_every: int = flag(8, "[1, inf)")  # optimiser steps between EMA updates
    mixed_precision: str = flag("auto", ("auto", "fp16", "bf16", "no"))  # fp16 (smaller log-prob mismatch); auto = fp16 on CUDA, no on CPU
    gradient_checkpointing: bool = flag(False, (False, True))  # recompute activations in backward: less memory, about 30 % slower
    device: str = flag("", cli.DEVICE)  # "" = cuda:LOCAL_RANK if CUDA is there, else cpu
    seed: int = flag(0, "[0, 1e18]")  # seeds every random draw, per iteration and rank
    out: str = flag("runs/sd35", text_range("a folder"))  # run folder: log.jsonl, curves.png, eval/ grids, checkpoints/
    resume: str = flag("", "text")  # a run folder (its newest checkpoint) or a checkpoint folder; a bare --resume means --out
    eval_every: int = flag(20, "[0, inf)")  # iterations between evaluations (0 = only at the end)
    eval_images: int = flag(16, "[0, inf)")  # test prompts per evaluation (0 = all)
    save_every: int = flag(20, "[0, inf)")  # iterations between checkpoints (and always at the end and on SIGINT/SIGTERM)
    eval_only: bool = flag(False, (False, True))  # evaluate the loaded (or base) model once and exit
    max_bad_steps: int = flag(5, "[1, inf)")  # stop after this many optimiser steps in a row with a NaN/inf gradient (each is skipped)
    reward_workers: int = flag(-1, "[-1, 1024]")  # processes scoring OCR (rewards.CPU_BOUND); -1 = CPU cores per local rank, 0 = in this process

    RELATIONS = (
        ("reward_url", lambda c: c.reward_url or "remote" not in parse_reward_spec(c.reward),
         "a reward server's URL with --reward={reward}"),
    )


AXES = {f.name for f in fields(minflow.Algorithm)}


class RunError(RuntimeError):
    """Something at run time that training cannot go on from; the message is one line."""


def parse_args(argv, world_size):
    """Flags -> (cfg, algo, train prompts, test prompts); a ValueError (one line: the flag, its
    value, what is expected) for any bad input, before anything heavy is loaded. A bare
    `--resume` continues the run in --out."""
    bare_resume = "--resume" in argv
    argv = [a for a in argv if a != "--resume"]
    axis_flags = [a for a in argv if a.removeprefix("--").partition("=")[0] in AXES]
    cfg = Config(**cli.parse_flags(Config, [a for a in argv if a not in axis_flags]))
    if bare_resume:
        cfg = replace(cfg, resume=cfg.out)
    cli.check_flags(cfg)
    algo = cli.read_flags(minflow.Algorithm, axis_flags, base=minflow.make_algorithm(cfg.algo))
    budget = cfg.group_size * cfg.prompts_per_iter
    if budget % world_size:  # the one check that needs the world size, so it lives here
        raise cli.FlagError(f"--prompts_per_iter={cfg.prompts_per_iter}: expected group_size x prompts_per_iter "
                            f"(now {budget}) to split evenly over the {world_size} ranks")
    try:
        train_prompts, test_prompts = load_prompts(cfg.prompts)
    except ValueError as error:
        raise ValueError(f"--prompts={cfg.prompts}: {error}") from None
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


def agree_on_failure(failure, ranks):
    """Raise RunError on every rank together if `failure` (this rank's error text, or None) is
    not None on any rank. A rank that failed alone would leave the others waiting forever in
    their next collective; this way all stop at the same point. Rank 0 prints the run's error,
    so another rank that failed prints its own message here."""
    failed = ranks.gather(torch.tensor([failure is not None]))
    if failed.any():
        if failure and not ranks.master:
            print(f"error on rank {ranks.rank}: {failure}", file=sys.stderr)
        raise RunError(failure or f"a reward failed on rank {int(failed.nonzero()[0])}; its output says which")


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
    logs.update(prompt_draw_logs(prompt_ids, tracker))
    sizes = minflow.group_sizes(algo, K, budget, tracker, prompt_ids)
    group_ids = torch.repeat_interleave(torch.arange(K), sizes)
    latent = cfg.resolution // 8
    noise = minflow.initial_noise(sizes, (pipe.transformer.config.in_channels, latent, latent), algo.shared_noise, plan)
    mine = ranks.share(budget)
    local_prompts = [prompts[i] for i in prompt_ids[group_ids[mine]].tolist()]
    texts, metadata = [p for p, _ in local_prompts], [m for _, m in local_prompts]

    cond = policy.encode_prompts(pipe, texts, cfg.guidance_scale, ranks.device)
    velocity = policy.guided_velocity(pipe.transformer, cond, cfg.guidance_scale, model_dtype, cfg.sample_batch, autocast)

    def score(latents, rows, total_only=False):
        """Decode here (on the device), then score: CPU-bound rewards run in the worker pool
        while this process goes on sampling, or estimating clean images."""
        rows = rows.tolist()
        return reward.submit(policy.decode(pipe.vae, latents, cfg.sample_batch), [texts[i] for i in rows],
                             [metadata[i] for i in rows], total_only)

    # A reward that fails on one rank must stop every rank, not leave the others waiting in
    # the gather below: each rank reports whether it failed, and all stop together.
    failure, step_rewards = None, None
    try:
        with reward.leave_cores_to_workers():
            # Each chunk of sample_batch trajectories is scored while the next one samples.
            traj, finals = policy.rollout_in_chunks(
                velocity, noise[mine].to(ranks.device), minflow.sd3_sigmas(cfg.num_steps), algo.sampler,
                algo.noise_level, generator(cfg.seed, it, "sde", ranks.rank, device=ranks.device), cfg.sample_batch, score)
            logs["seconds_sampling"] = time.perf_counter() - timer
            timer = time.perf_counter()
            if algo.step_credit == "gains":
                # Only the states next to a trained step, r_0 once per group with shared noise, in
                # passes of sample_batch rows; the final rewards are still being scored meanwhile.
                groups = group_ids[mine] if algo.shared_noise else None
                step_rewards = minflow.step_rewards(
                    velocity, traj, lambda x0, rows: score(x0, rows, total_only=True), algo.substeps,
                    needed=minflow.needed_states(traj.stds), groups=groups, batch_size=cfg.sample_batch)
            local_rewards, terms = collect_scores(finals, len(texts))
        if step_rewards is not None:
            step_rewards[:, -1] = local_rewards
    except RewardError as error:
        failure = str(error)
    agree_on_failure(failure, ranks)
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
        logs["tracker_clipped"] = tracker.clipped
    terms = {k: ranks.gather(v.float().cpu()) for k, v in terms.items()}
    logs.update({"reward_mean": rewards[valid].mean().item(), "reward_std": rewards[valid].std(unbiased=False).item(),
                 "dropped_samples": int((~valid).sum()), "zero_std_ratio": minflow.zero_std_fraction(rewards[valid], group_ids[valid]),
                 "group_sizes": sizes.tolist(), **{f"reward_{k}": v[v.isfinite()].mean().item() for k, v in terms.items()}})
    return traj, cond, adv[mine], logs


def collect_scores(chunks, size):
    """Wait for the scores of policy.rollout_in_chunks' chunks -> (total [size], {term: [size]})."""
    total, terms = torch.empty(size), {}
    for rows, pending in chunks:
        chunk_total, chunk_terms = pending.result()
        total[rows] = chunk_total
        for name, term in chunk_terms.items():
            terms.setdefault(name, torch.empty(size))[rows] = term
    return total, terms


def prompt_draw_logs(prompt_ids, tracker):
    """What the iteration's prompt draw looked like: the ids (identical on every rank, each
    from the same seeded plan and the same all-gathered tracker), how many are distinct, and
    under a tracker how uncertain the drawn prompts are next to the whole pool's mean (a
    prioritised draw should pick the uncertain ones) and how many prompts it had seen before
    this draw."""
    logs = {"prompt_ids": prompt_ids.tolist(), "distinct_prompts": len(prompt_ids.unique())}
    if tracker is not None:
        pool = tracker.uncertainty(torch.arange(len(tracker.visits)))
        logs.update(drawn_uncertainty=pool[prompt_ids].mean().item(), pool_uncertainty=pool.mean().item(),
                    prompts_seen=int((tracker.visits > 0).sum()))
    return logs


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
    failure = None
    try:
        total, terms = reward(images, texts, metadata)
    except RewardError as error:
        failure = str(error)
    agree_on_failure(failure, ranks)
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
    try:  # every check that needs no model weights, before any load
        cfg, algo, train_prompts, test_prompts = parse_args(argv, int(os.environ.get("WORLD_SIZE", 1)))
        ranks = Ranks(cfg.device)
        identity = {"model": cfg.model, "lora_rank": cfg.lora_rank, "algorithm": asdict(algo)}
        out = Path(cfg.out)
        # A folder with a checkpoint holds a run to continue, not to overwrite. (A log alone is
        # a run killed before its first save: starting afresh replays exactly what it lost.)
        if not cfg.resume and not cfg.eval_only and checkpoint.newest(out):
            raise ValueError(f"--out={out} already holds a run; pass --resume to continue it, or another --out")
        resume_from = checkpoint.newest(cfg.resume) if cfg.resume else None
        if cfg.resume and resume_from is None:
            raise ValueError(f"--resume={cfg.resume}: no complete checkpoint there")
        if resume_from:
            checkpoint.check_identity(resume_from, identity)
        config = policy.transformer_config(cfg.model)
        # The model's own side (64 px for tiny), at most Flow-GRPO's 512 px for SD3.5 (whose own is 1024).
        default_resolution = min(512, config["sample_size"] * 8)
        cfg = replace(cfg, resolution=cfg.resolution or default_resolution)
        side = cfg.resolution // 8 // config["patch_size"]
        if side > config["pos_embed_max_size"]:
            raise ValueError(f"--resolution={cfg.resolution} needs {side} patches a side; this model takes at most "
                             f"{config['pos_embed_max_size']} ({config['pos_embed_max_size'] * 8 * config['patch_size']} px)")
        out.mkdir(parents=True, exist_ok=True)
        probe = out / f".write-test-{ranks.rank}"
        probe.write_bytes(b"")
        probe.unlink()
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
    tracked_range = reward_range(reward.weights)
    tracker = minflow.new_tracker(algo, len(train_prompts), reward_range=tracked_range)
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
        print(f"resolution: {cfg.resolution} px" + (" (the model's default; --resolution changes it)"
                                                    if cfg.resolution == default_resolution else ""))
        print(f"algorithm: {algo}")
        if tracker is not None:
            print(f"prompt tracker: {algo.tracker}, rewards mapped to [0, 1] from "
                  + (f"the fixed range [{tracked_range[0]:g}, {tracked_range[1]:g}] of --reward={cfg.reward}"
                     if tracked_range else "the running min..max seen (this reward mix declares no range)"))

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

    # A failure every rank agrees on (a reward failing on any rank, NaN rewards or gradients)
    # ends the loop on every rank together: (error, iterations completed).
    failure = None
    if cfg.eval_only:
        try:
            log({"iteration": start, **evaluated(start)})
            if ranks.master:
                curves.draw(read_log(log_path), out / "curves.png")
        except RunError as error:
            failure = (error, start)
    stop = {"signal": 0}
    for sig in (signal.SIGINT, signal.SIGTERM):
        signal.signal(sig, lambda signum, frame: stop.update(signal=signum))
    progress = tqdm(range(start, cfg.iters if not cfg.eval_only else start), disable=not ranks.master, desc="RL iterations")
    saved, bad_steps = start, 0
    for it in progress:
        try:  # a RunError from sampling and scoring comes before the iteration changes any state
            traj, cond, adv, logs = sample_and_score(it, cfg, algo, pipe, model_dtype, autocast, reward, train_prompts, tracker, ranks)
        except RunError as error:
            failure = (error, it)
            break
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
        evaluating = (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.iters
        if evaluating:
            try:
                logs.update(evaluated(done))
            except RunError as error:  # the iteration trained: it is logged and saved without its evaluation
                failure = (error, done)
        log({"iteration": done, **logs})
        if evaluating and ranks.master:
            curves.draw(read_log(log_path), out / "curves.png")
        progress.set_postfix(reward=f"{logs['reward_mean']:.3f}", ratio=f"{logs.get('ratio', 1):.4f}")
        if bad_steps >= cfg.max_bad_steps:  # the iteration ran (its updates skipped): it counts as done
            failure = (RunError(f"{bad_steps} optimiser steps in a row had a NaN or infinite gradient (all skipped); "
                                f"lower --lr, or check the rewards and --mixed_precision"), done)
        if failure:
            break
        interrupted = ranks.gather(torch.tensor([stop["signal"]]))  # every rank stops together
        if (cfg.save_every and done % cfg.save_every == 0) or done == cfg.iters or interrupted.any():
            save(done)
            saved = done
        if interrupted.any():
            if ranks.master:
                print(f"stopped by signal {int(interrupted.max())} after iteration {done}; checkpoint saved")
            break
    if failure and failure[1] > saved:  # keep the iterations not yet in a checkpoint
        save(failure[1])
    reward.close()  # the scoring workers, now rather than at interpreter exit
    if ranks.ddp:
        if failure is None:
            in_sync = ranks_in_sync(params, ranks)
            if ranks.master:
                log({"ranks_in_sync": in_sync})
        # Free DDP while the process group is still registered. Otherwise DDP's Reducer is the
        # group's last owner and destroys it while holding the GIL, which can deadlock with
        # gloo's worker thread (pytorch/pytorch#56297); destroy_process_group releases it.
        # Every rank gets here, on success and on failure alike, so none is left waiting.
        del model
        gc.collect()
        dist.destroy_process_group()
    if failure:
        error, completed = failure
        if ranks.master:
            print(f"error: {error} (newest checkpoint: iteration {max(completed, saved)})", file=sys.stderr)
        sys.exit(1)


def ranks_in_sync(params, ranks):
    """Whether every rank ends with bitwise the same LoRA weights (DDP's promise, checked)."""
    flat = torch.cat([p.detach().float().flatten().cpu() for p in params])
    return bool((ranks.gather(flat[None]) == flat).all())


if __name__ == "__main__":
    main(sys.argv[1:])
