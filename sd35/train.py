"""Fine-tune Stable Diffusion 3.5 Medium with Flow-GRPO, Stepwise-Flow-GRPO or SuperFlow, alone or
under torchrun (its RANK, WORLD_SIZE, LOCAL_RANK switch data parallelism on: NCCL on GPUs, gloo
on CPUs; rank 0 logs, evaluates and saves). docs/sd35.md has the commands for one GPU, many and resuming.

    python sd35/train.py --model=tiny --iters=2                      # CPU smoke run at 64 px, no download
    torchrun --nproc_per_node=8 sd35/train.py --algo=superflow --reward=pickscore --prompts=general
    python sd35/train.py --help                                      # every flag, its default and range

`--algo` picks a preset; a field of minflow.Algorithm given as a flag overrides that axis. Every
RL formula lives in minflow.py; this file feeds it images, rewards and gradients.
"""
import hashlib
import importlib.util
import json
import math
import os
import signal
import sys
import time
from contextlib import nullcontext, suppress
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
import torch.distributed as dist
from einops import rearrange
from PIL import Image
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import minflow  # noqa: E402
from cli import flag, parses, text_range  # noqa: E402
from sd35 import checkpoint, curves, models, policy, shapes  # noqa: E402
from sd35.data import SHIPPED_SETS, load_prompts  # noqa: E402
from sd35.ranks import Ended, Ranks, RunError, together  # noqa: E402
from sd35.rewards import (REWARDS, RewardMix, RewardOptions, encoded, parse_range,  # noqa: E402
                          parse_reward_spec)

PRESET = text_range(f"a preset ({', '.join(minflow.PRESETS)}), optionally with :axis=value overrides",
                    parses(cli.make_algorithm))
REWARD_SPEC = text_range(f"rewards from {', '.join(sorted(REWARDS))} with optional weights, e.g. ocr=0.8,pickscore=0.2",
                         parses(parse_reward_spec))
URL = text_range("empty or an http(s):// URL", lambda v: v == "" or v.startswith(("http://", "https://")))
RANGE = text_range("empty or lo,hi with finite lo < hi", parses(parse_range))
PROMPT_SET = text_range(f"a shipped set ({', '.join(SHIPPED_SETS)}) or a folder",
                        lambda v: v in SHIPPED_SETS or (v != "" and Path(v).is_dir()))


@dataclass
class Config:
    model: str = flag("stabilityai/stable-diffusion-3.5-medium", models.MODEL)  # the model to fine-tune; tiny and sd35m-random are built in code, no download; shapes (pretrained, shipped) brings its own defaults
    algo: str = flag("flow_grpo", PRESET)  # stepwise runs on Flow-GRPO's SDE, stepwise_ddim on the DDIM-inspired one; axis flags override
    reward: str = flag("ocr", REWARD_SPEC)  # one reward or a weighted mix, e.g. ocr=0.8,pickscore=0.2 (sd35/rewards.py)
    reward_url: str = flag("", URL)  # the reward server, for --reward=remote
    reward_timeout: float = flag(120.0, "(0, 180]")  # seconds the reward server has for each of 3 tries; 3 x 180 s fits NCCL's 10-minute collective timeout
    remote_range: str = flag("", RANGE)  # the server's score range, for the prompt tracker; "" = its running min..max
    prompts: str = flag("ocr", PROMPT_SET)  # shipped set (ocr, general, shapes) or a folder with train/test .txt or .jsonl
    group_size: int = flag(8, "[2, inf)")  # G, trajectories per prompt (the mean size under binned sizes); 24 in the paper
    prompts_per_iter: int = flag(8, "[1, inf)")  # groups per iteration; trajectories per iteration = group_size x this, over all ranks
    num_steps: int = flag(10, "[2, 1000]")  # sampling steps in training (at most the scheduler's training timesteps)
    eval_num_steps: int = flag(40, "[1, 1000]")  # ODE steps in evaluation
    guidance_scale: float = flag(4.5, "[1, 100]")  # CFG in sampling and training; 1 switches CFG off
    resolution: int = flag(0, models.RESOLUTION)  # image side in pixels; 0 = the model's own (512 for SD3.5, 64 for tiny)
    iters: int = flag(300, "[0, inf)")  # RL iterations
    minibatches: int = flag(2, "[1, inf)")  # optimiser steps per iteration, each over a share of the transitions
    train_batch: int = flag(8, "[1, inf)")  # transitions per forward-backward (gradients accumulate beyond it)
    sample_batch: int = flag(16, "[1, inf)")  # trajectories per forward pass while sampling, decoding and encoding prompts
    lr: float = flag(3e-4, "(0, 1]")  # AdamW learning rate of the LoRA
    weight_decay: float = flag(1e-4, "[0, 1]")  # AdamW weight decay
    grad_clip: float = flag(1.0, "(0, inf)")  # gradient-norm clip
    clip_range: float = flag(1e-4, "(0, 1)")  # PPO clip; tiny because log-probs average over every latent dimension
    beta: float = flag(0.004, "[0, inf)")  # KL weight; our KL is exact (divides by std^2), hence smaller than the reference's
    lora_rank: int = flag(32, "[1, inf)")  # LoRA rank r
    lora_alpha: int = flag(64, "[1, inf)")  # LoRA alpha (scale alpha / r)
    ema_decay: float = flag(0.9, "[0, 1)")  # evaluate an EMA of the LoRA weights (Flow-GRPO's default); 0 evaluates the live weights
    ema_every: int = flag(8, "[1, inf)")  # optimiser steps between EMA updates
    mixed_precision: str = flag("auto", models.MIXED_PRECISION)  # auto = fp16 on CUDA (smaller log-prob mismatch), no on CPU
    gradient_checkpointing: bool = flag(False, (False, True))  # recompute activations in backward: less memory, slower
    text_encoders: str = flag("free", ("free", "keep"))  # free: embed every prompt at start-up, then drop the encoders; keep: encode each iteration
    prompt_cache: str = flag("", "text")  # folder of the prompt-embedding file with --text_encoders=free ("" = --out); runs of one model and prompt set share it
    report_to: str = flag("none", ("none", "tensorboard", "wandb"))  # also mirror the log to tensorboard or wandb (wandb reads its WANDB_* environment)
    device: str = flag("", cli.DEVICE)  # "" = cuda:0 (under torchrun cuda:LOCAL_RANK) if CUDA is there, else cpu
    seed: int = flag(0, "[0, 1e18]")  # seeds every random draw, per iteration and rank
    out: str = flag("runs/sd35", text_range("a folder"))  # run folder: log.jsonl, curves.png, eval/ grids, checkpoints/
    resume: str = flag("", "text")  # a run folder (its newest checkpoint) or a checkpoint folder; a bare --resume means --out
    eval_every: int = flag(20, "[0, inf)")  # iterations between evaluations (0 = only at the end)
    eval_images: int = flag(16, "[0, inf)")  # test prompts per evaluation (0 = all)
    save_every: int = flag(20, "[0, inf)")  # iterations between checkpoints (and always at the end and on SIGINT/SIGTERM)
    keep_checkpoints: int = flag(0, "[0, inf)")  # keep this many newest checkpoints, deleting older ones once a newer one is complete; 0 = keep all
    keep_best: bool = flag(False, (False, True))  # also keep the best evaluation's LoRA in OUT/best/, its iteration and eval_reward in best.json
    eval_only: bool = flag(False, (False, True))  # evaluate the loaded (or base) model once and exit
    max_bad_steps: int = flag(5, "[1, inf)")  # stop after this many optimiser steps in a row with a NaN/inf gradient (each is skipped)
    reward_workers: int = flag(-1, "[-1, 1024]")  # processes scoring OCR (rewards.CPU_BOUND); -1 = CPU cores per local rank, 0 = in this process

    RELATIONS = (
        ("reward_url", lambda c: c.reward_url or "remote" not in parse_reward_spec(c.reward),
         "a reward server's URL with --reward={reward}"),
        ("report_to", lambda c: c.report_to == "none" or importlib.util.find_spec(c.report_to),
         "a tracker whose package is installed (pip install {report_to})"),
    )

    @property
    def budget(self):
        """Trajectories per iteration over all ranks."""
        return self.group_size * self.prompts_per_iter


def parse_args(argv):
    """Flags -> (cfg, algo, train prompts, test prompts), or a ValueError of one line naming the flag."""
    if "--help" in argv or "-h" in argv:
        axes = cli.help_text(minflow.Algorithm)
        print(cli.help_text(Config) + "\n\nAlgorithm axes, each overriding the --algo preset's value "
              "(the defaults shown are flow_grpo's):\n" + axes[axes.index("\n  --") + 1:])
        raise SystemExit(0)
    bare_resume = "--resume" in argv
    argv = [a for a in argv if a != "--resume"]
    axis_names = {f.name for f in fields(minflow.Algorithm)}
    axis_flags = [a for a in argv if a.removeprefix("--").partition("=")[0] in axis_names]
    given = cli.parse_flags(Config, [a for a in argv if a not in axis_flags])
    own = shapes.TRAIN_DEFAULTS if given.get("model") == "shapes" else {}  # sized for it, under the flags given
    cfg = Config(**{**own, **given})
    cfg = replace(cfg, resume=cfg.out) if bare_resume else cfg
    cli.check_flags(cfg)
    algo = cli.read_flags(minflow.Algorithm, axis_flags, base=cli.make_algorithm(cfg.algo))
    try:
        minflow.check_trains_something(algo, minflow.sd3_sigmas(cfg.num_steps))
    except ValueError as error:  # any of the three flags may be the one to change
        raise cli.FlagError(f"{error} (with --noise_level={algo.noise_level} and --num_steps={cfg.num_steps})") from None
    try:
        train_prompts, test_prompts = load_prompts(cfg.prompts)
    except ValueError as error:
        raise ValueError(f"--prompts={cfg.prompts}: {error}") from None
    return cfg, algo, train_prompts, test_prompts


def generator(*key, device="cpu"):
    """A generator seeded by a tuple (seed, iteration, purpose, ...): draws are a function of
    where they happen, so a resumed run repeats them. (Not hash(), which differs between processes.)"""
    return torch.Generator(device).manual_seed(int(hashlib.sha256(repr(key).encode()).hexdigest()[:15], 16))


@dataclass
class Run:
    """What every part of an iteration reads and none changes."""
    cfg: Config
    algo: minflow.Algorithm
    pipe: object
    dtype: torch.dtype
    autocast: object  # a context factory for mixed precision, or None
    ranks: Ranks
    reward: RewardMix
    prompts: policy.PromptBank  # train prompts, then test prompts
    train_prompts: list
    test_prompts: list

    def velocity(self, cond, batch_size):
        """The transformer's guided velocity, which raises Stop before its forward pass once a stop signal
        came: sampling, the evaluation and training all stop within one pass."""
        guided = policy.guided_velocity(self.pipe.transformer, cond, self.cfg.guidance_scale, self.dtype, batch_size,
                                        self.autocast)
        return lambda *args: self.ranks.check_stop() or guided(*args)


def plan_iteration(run, it, tracker):
    """The iteration's prompts, each trajectory's group and the initial noise, the same on every rank,
    and the logs of the draw (under a tracker: its uncertainties before this iteration's update)."""
    plan, K = generator(run.cfg.seed, it, "plan"), run.cfg.prompts_per_iter
    prompt_ids = minflow.choose_prompts(run.algo, len(run.train_prompts), K, tracker, plan)
    sizes = minflow.allocate_groups(run.algo, K, run.cfg.budget, tracker, prompt_ids)
    latent = run.cfg.resolution // 8
    noise = minflow.initial_noise(sizes, (run.pipe.transformer.config.in_channels, latent, latent),
                                  run.algo.shared_noise, plan)
    logs = {"prompt_ids": prompt_ids.tolist(), "distinct_prompts": len(prompt_ids.unique()),
            "group_sizes": sizes.tolist()}
    if tracker is not None:
        pool = tracker.uncertainty(torch.arange(len(tracker.visits)))
        logs.update(drawn_uncertainty=pool[prompt_ids].mean().item(), pool_uncertainty=pool.mean().item(),
                    prompts_seen=int((tracker.visits > 0).sum()))
    return prompt_ids, torch.repeat_interleave(torch.arange(K), sizes), noise, logs


def sample_and_score(run, it, tracker):
    """Roll out this rank's share of the groups and score it (for gains also the states the trained
    gains need) -> (local trajectories, conditioning, the whole batch's advantages [budget, T], logs)."""
    timer, cfg, ranks, budget = time.perf_counter(), run.cfg, run.ranks, run.cfg.budget
    prompt_ids, group_ids, noise, logs = plan_iteration(run, it, tracker)
    mine = ranks.share(budget)
    index = prompt_ids[group_ids[mine]]
    texts, metadata = zip(*[run.train_prompts[i] for i in index.tolist()])
    cond = run.prompts(index)
    velocity = run.velocity(cond, cfg.sample_batch)
    images_seen = []

    def score(latents, traj_index, total_only=False):
        """Decode here, then score: the worker pool scores while this process goes on sampling."""
        images = policy.decode(run.pipe.vae, latents, cfg.sample_batch)
        if not total_only:
            images_seen.append(policy.image_statistics(images))
        return run.reward.submit(images, [texts[i] for i in traj_index], [metadata[i] for i in traj_index], total_only)

    along = None
    with together(ranks), run.reward.leave_cores_to_workers():
        traj, finals = policy.rollout_in_chunks(
            velocity, noise[mine].to(ranks.device), policy.sigma_grid(run.pipe.scheduler, cfg.num_steps), run.algo,
            generator(cfg.seed, it, "sde", ranks.rank, device=ranks.device), cfg.sample_batch, score)
        logs["seconds_sampling"], timer = time.perf_counter() - timer, time.perf_counter()
        groups = group_ids[mine] if run.algo.shared_noise else None
        if run.algo.step_credit == "gains":  # each pass is scored while the next runs, as are the finals
            along = [(b, k, score(x0, b, total_only=True)) for b, k, x0 in policy.clean_estimate_passes(
                velocity, traj, run.algo.substeps, minflow.needed_states(traj.stds), groups, cfg.sample_batch)]
        results = [pending.result() for _, pending in finals]  # the chunks in order
        local = {"reward": torch.cat([total for total, _ in results]),
                 **{f"reward_{k}": torch.cat([terms[k] for _, terms in results]) for k in results[0][1]},
                 **{k: torch.cat([s[k] for s in images_seen]) for k in images_seen[0]}}
        if along is not None:
            along = policy.reward_table(traj.xs.shape[1], [(b, k, p.result()) for b, k, p in along],
                                        local["reward"], groups)
    with together(ranks):  # a rank may see the others disagree while they see nothing wrong
        if not torch.equal(ranks.gather(index, budget), prompt_ids[group_ids]):
            raise RunError("ranks disagree on the iteration's prompts; check that every rank runs the same flags")
    gathered = {key: ranks.gather(value.float().cpu(), budget) for key, value in local.items()}
    along = None if along is None else ranks.gather(along, budget)
    logs["seconds_reward"] = time.perf_counter() - timer
    adv, credit_logs = credit(run, it, tracker, prompt_ids[group_ids], group_ids, traj.stds, gathered, along)
    logs.update(**credit_logs, **{k: v.mean().item() for k, v in gathered.items() if k.startswith("image_")})
    return traj, cond, adv, logs


def credit(run, it, tracker, ids, group_ids, stds, gathered, along):
    """The advantages [budget, T] from the gathered rewards ("reward" the total, "reward_name" each term),
    the tracker's update and the reward logs. A sample with a NaN or infinite reward is dropped (advantage
    0, in no statistic); `along` is NaN at the states no trained gain needs."""
    total = gathered["reward"]
    used = None if along is None else along[:, minflow.needed_states(stds)]
    valid = torch.isfinite(total) & (True if used is None else torch.isfinite(used).all(1))
    if not valid.any():
        raise RunError(f"iteration {it + 1}: every reward is NaN or infinite; check the reward function")
    baseline = tracker.baseline(ids[valid]) if run.algo.baseline == "tracker" else None
    adv = torch.zeros(run.cfg.budget, len(stds))
    adv[valid] = minflow.step_advantages(run.algo, total[valid], group_ids[valid], stds,
                                         None if along is None else along[valid], baseline)
    logs = {"reward_mean": total[valid].mean().item(), "reward_std": total[valid].std(unbiased=False).item(),
            "dropped_samples": int((~valid).sum()), "zero_std_ratio": minflow.zero_std_fraction(total[valid], group_ids[valid]),
            **{k: v[v.isfinite()].mean().item() for k, v in gathered.items() if k.startswith("reward_")}}
    if tracker is not None:
        tracker.update(ids[valid], total[valid])
        logs["tracker_clipped"] = tracker.clipped
    return adv, logs


def optimise(run, it, state, traj, cond, adv):
    """The PPO update: cfg.minibatches optimiser steps over the informative transitions (nonzero advantage),
    each rank computing the gradient of its share's rows, from the whole batch's `adv` [budget, T]. A row
    weighs 1 / N (N: the step's rows on all ranks, known to every rank from `adv`) and the ranks' gradients
    are summed once per step, after they agree: the step is one big batch's mean whatever the shares, and
    a rank that failed in its passes is known before any rank waits in the sum."""
    cfg, ranks, trained = run.cfg, run.ranks, minflow.trained_steps(traj.stds)
    mine = adv[ranks.share(cfg.budget)]
    counts = [int(((adv[ranks.share(cfg.budget, r)] != 0) & trained).sum()) for r in range(ranks.world)]
    totals = torch.tensor([[len(c) for c in torch.arange(n).tensor_split(cfg.minibatches)] for n in counts]).sum(0)
    rows = minflow.transitions(traj, mine, trained.expand_as(mine))
    informative = (rows["advantage"] != 0).nonzero()[:, 0]
    shuffle = generator(cfg.seed, it, "shuffle", ranks.rank)
    informative = informative[torch.randperm(len(informative), generator=shuffle)]
    stats, first_ratios, grad_norms = [], [], []
    for step_rows, total in zip(informative.tensor_split(cfg.minibatches), totals.tolist()):
        if total == 0:  # no rank has a row for this step
            continue
        with together(ranks):
            for idx in step_rows.split(cfg.train_batch):
                weight = torch.full((len(idx),), 1 / total)
                loss, s = train_pass(run, cond, {k: v[idx] for k, v in rows.items()}, weight)
                state.scaler.scale(loss).backward()
                stats.append({**s, "policy_loss": loss.item()})
                if not grad_norms:  # before this iteration's first step the policy is the one that sampled
                    first_ratios.append(s["ratio"])
        ranks.sum_gradients(state.params)
        state.scaler.unscale_(state.optimizer)
        grad_norm = torch.nn.utils.clip_grad_norm_(state.params, cfg.grad_clip)
        if torch.isfinite(grad_norm):  # a NaN/inf loss or gradient: skip the step (all ranks agree)
            state.scaler.step(state.optimizer)
        state.scaler.update()
        state.optimizer.zero_grad(set_to_none=True)
        grad_norms.append(grad_norm.item())
    logs = {key: sum(s[key] for s in stats) / len(stats) for key in (stats[0] if stats else {})}
    if first_ratios:
        logs["ratio_first"] = sum(first_ratios) / len(first_ratios)
    finite = [g for g in grad_norms if math.isfinite(g)]
    return {**logs, "grad_norm": max(finite, default=0.0), "optimiser_steps": len(grad_norms),
            "skipped_steps": [not math.isfinite(g) for g in grad_norms]}


def train_pass(run, cond, rows, weight):
    """One forward pass of the loss over a micro-batch of transitions -> (loss, stats)."""
    step_cond = cond.select(rows["sample"])
    ref_velocity = policy.reference_velocity(run.pipe.transformer, run.velocity(step_cond, None))
    rows = {k: v.to(run.ranks.device) for k, v in rows.items() if k != "sample"}
    return minflow.policy_loss(run.velocity(step_cond, None), rows, run.algo, run.cfg.clip_range, run.cfg.beta,
                               ref_velocity, weight.to(run.ranks.device))


def framed(images, scores, score_range):
    """Images [B, 3, H, W] in [0, 1] -> uint8 [B, 3, H, W], each in a frame from red (the bottom of the
    reward's range; of these scores' own span for a remote reward without one) to green (its top):
    a grid then shows which samples score, and one evaluation against another shows what moved."""
    lo, hi = score_range or (scores.min().item(), scores.max().item())
    share = ((scores.float().cpu() - lo) / max(hi - lo, 1e-6)).clamp(0, 1)[:, None, None, None]
    width = max(1, images.shape[-1] // 32)
    inside = torch.zeros(images.shape[-2:], dtype=torch.bool)
    inside[width:-width, width:-width] = True
    frame = torch.cat([1 - share, share, torch.zeros_like(share)], 1).expand(images.shape)
    return (torch.where(inside, images.float().cpu(), frame) * 255).round().to(torch.uint8)


@torch.no_grad()
def evaluate(run, it, out, mirror):
    """ODE samples of the test prompts from fixed noise: mean reward per term, and a grid PNG."""
    cfg, ranks = run.cfg, run.ranks
    chosen = len(run.test_prompts[:cfg.eval_images or len(run.test_prompts)])
    per_rank = math.ceil(chosen / ranks.world)  # every rank scores as many, the last ones repeating the first
    mine = torch.arange(ranks.rank * per_rank, (ranks.rank + 1) * per_rank) % chosen
    latent = cfg.resolution // 8
    noise = torch.randn((chosen, run.pipe.transformer.config.in_channels, latent, latent),
                        generator=generator(cfg.seed, "eval"))
    velocity = run.velocity(run.prompts(mine + len(run.train_prompts)), cfg.sample_batch)
    sigmas = policy.sigma_grid(run.pipe.scheduler, cfg.eval_num_steps)
    traj = minflow.rollout(velocity, noise[mine].to(ranks.device), sigmas, "ode")
    images = policy.decode(run.pipe.vae, traj.xs[:, -1], cfg.sample_batch)
    texts, metadata = zip(*[run.test_prompts[i] for i in mine.tolist()])
    with together(ranks):
        total, terms = run.reward(images, list(texts), list(metadata))
    logs = {"eval_reward": ranks.gather(total.float().cpu())[:chosen].mean().item(),
            **{f"eval_reward_{k}": ranks.gather(v.float().cpu())[:chosen].mean().item() for k, v in terms.items()}}
    grid = ranks.gather(framed(images, total, run.reward.range))[:chosen]
    if ranks.master:
        cols = math.ceil(math.sqrt(len(grid)))
        grid = torch.cat([grid, torch.zeros((-len(grid) % cols, *grid.shape[1:]), dtype=torch.uint8)])
        pixels = rearrange(grid, "(r c) ch h w -> (r h) (c w) ch", c=cols).numpy()
        (out / "eval").mkdir(exist_ok=True)
        cli.atomic_write(out / "eval" / f"iter_{it:06d}.png", encoded(Image.fromarray(pixels), format="PNG"))
        mirror.log(it, images={"eval_grid": pixels})
    return logs


def check_before_loading(argv):
    """Every check that needs no weights -> (cfg, algo, train and test prompts, ranks, the checkpoint to
    resume or None, its iteration or 0, the run's identity: the flags a checkpoint must match)."""
    cfg, algo, train_prompts, test_prompts = parse_args(argv)
    ranks = Ranks(cfg.device, cfg.out)
    if cfg.budget < ranks.world:
        raise cli.FlagError(f"--prompts_per_iter={cfg.prompts_per_iter}: expected group_size x prompts_per_iter "
                            f"(now {cfg.budget}) to be at least the {ranks.world} ranks")
    identity = {"model": cfg.model, "lora_rank": cfg.lora_rank, "lora_alpha": cfg.lora_alpha}  # what LORA_FILE needs
    if not cfg.eval_only:  # and what resuming the training reads
        identity.update(algorithm=asdict(algo), ema_decay=cfg.ema_decay, ema_every=cfg.ema_every)
        if algo.uses_tracker:  # its tensors are per train prompt, on the reward's range
            digest = hashlib.sha256(json.dumps(train_prompts).encode()).hexdigest()[:12]
            identity.update(tracked_prompts=f"{len(train_prompts)} prompts, sha256 {digest}",
                            tracked_reward=parse_reward_spec(cfg.reward))
    out = Path(cfg.out)
    # A folder with a checkpoint holds a run to continue, not to overwrite. (A log alone is a
    # run killed before its first save: starting afresh replays exactly what it lost.)
    if not cfg.resume and not cfg.eval_only and checkpoint.checkpoints(out):
        raise ValueError(f"--out={out} already holds a run; pass --resume to continue it, or another --out")
    corrupt = []  # a checkpoint whose files do not match their checksums, newer than the one resumed
    resume_from = checkpoint.newest(cfg.resume, corrupt) if cfg.resume else None
    if cfg.resume and resume_from is None:
        raise ValueError(f"--resume={cfg.resume}: " + ("no checkpoint there verifies: " + "; ".join(corrupt) if corrupt
                                                       else "no complete checkpoint there"))
    if corrupt and ranks.master:
        print(f"{'; '.join(corrupt)}; resuming from the newest checkpoint that verifies, {resume_from}")
    start = checkpoint.check_identity(resume_from, identity)["iteration"] if resume_from else 0
    cfg = replace(cfg, resolution=models.resolution(cfg.model, cfg.resolution)[0])
    out.mkdir(parents=True, exist_ok=True)
    (out / f".write-test-{ranks.rank}").write_bytes(b"")
    (out / f".write-test-{ranks.rank}").unlink()
    return cfg, algo, train_prompts, test_prompts, ranks, resume_from, start, identity


def build(cfg, algo, train_prompts, test_prompts, ranks):
    """Load the model, the rewards and the prompt embeddings -> (Run, TrainState before resuming)."""
    dtype = models.autocast_dtype(cfg.mixed_precision, ranks.device) or torch.float32
    if ranks.master:  # what the run will hold on the accelerator, from the model's configs alone
        plan = models.MemoryPlan(cfg.resolution, cfg.train_batch, cfg.lora_rank, cfg.text_encoders == "keep",
                                 -(-cfg.budget // ranks.world), cfg.num_steps, cfg.sample_batch,
                                 tuple(parse_reward_spec(cfg.reward)))
        print(models.format_memory_table(models.memory_estimate(cfg.model, dtype, plan),
            torch.cuda.get_device_properties(ranks.device).total_memory if ranks.device.type == "cuda" else None))
    torch.manual_seed(cfg.seed)  # only the LoRA's initial weights draw from the global generator
    autocast = (lambda: torch.autocast(ranks.device.type, dtype=dtype)) if dtype != torch.float32 else None
    workers = cfg.reward_workers if cfg.reward_workers >= 0 else \
        max(1, len(os.sched_getaffinity(0)) // int(os.environ.get("LOCAL_WORLD_SIZE", 1)))
    reward = RewardMix(cfg.reward, RewardOptions(device=str(ranks.device), remote_url=cfg.reward_url or None,
                                                 remote_timeout=cfg.reward_timeout,
                                                 remote_range=parse_range(cfg.remote_range)), workers)
    pipe = models.load_pipeline(cfg.model, dtype, ranks.device)
    prompts = policy.PromptBank(pipe, [p for p, _ in train_prompts + test_prompts], cfg.guidance_scale, ranks.device,
                                cfg.sample_batch, None if cfg.text_encoders == "keep" else cfg.prompt_cache or cfg.out,
                                cfg.model)
    transformer = pipe.transformer
    params = policy.add_lora(transformer, cfg.lora_rank, cfg.lora_alpha)
    if cfg.gradient_checkpointing:
        transformer.enable_gradient_checkpointing()
    state = checkpoint.TrainState(
        transformer, torch.optim.AdamW(params, lr=cfg.lr, weight_decay=cfg.weight_decay),
        torch.amp.GradScaler(ranks.device.type, enabled=dtype == torch.float16),
        minflow.new_tracker(algo, len(train_prompts), reward_range=reward.range),
        policy.LoraEMA(params, cfg.ema_decay, cfg.ema_every) if cfg.ema_decay > 0 and not cfg.eval_only else None)
    return Run(cfg, algo, pipe, dtype, autocast, ranks, reward, prompts, train_prompts, test_prompts), state


def describe_run(run, state, start):
    """The start-up lines: the batch arithmetic, resolution, algorithm and tracker."""
    cfg, algo, world, budget = run.cfg, run.algo, run.ranks.world, run.cfg.budget
    per, extra = divmod(budget, world)
    sigmas = policy.sigma_grid(run.pipe.scheduler, cfg.num_steps)
    trained = int(minflow.trained_steps(minflow.step_std(sigmas[:-1], sigmas[1:], algo.sampler, algo.noise_level,
                                                         algo.ddim_noise)).sum())
    spread = f"{per}-{per + 1} ({per + 1} on the first {extra}, {per} on the rest)" if extra else f"{per}"
    print(f"batch: {cfg.prompts_per_iter} prompts x {'mean ' if algo.group_sizing != 'fixed' else ''}{cfg.group_size} = "
          f"{budget} trajectories per iteration, {world} rank(s) x {spread}; {trained} of {cfg.num_steps} steps "
          f"trained -> up to {budget * trained} transitions per iteration in {cfg.minibatches} optimiser steps of "
          f"micro-batches of {cfg.train_batch}; {len(run.train_prompts)} train / {len(run.test_prompts)} test prompts; "
          f"{str(run.dtype).removeprefix('torch.')}; {sum(p.numel() for p in state.params) / 1e6:.2f}M LoRA "
          f"parameters; from iteration {start}; {run.ranks.device}")
    default = models.resolution(cfg.model, 0)[0]
    print(f"resolution: {cfg.resolution} px" + (" (the model's default; --resolution changes it)"
                                                if cfg.resolution == default else ""))
    print(f"algorithm: --algo={cfg.algo} samples with the {algo.sampler} SDE"
          f"{f' ({algo.ddim_noise} schedule)' if algo.sampler == 'ddim' else ''} at noise level {algo.noise_level}; {algo}")
    if state.tracker is not None:
        tracked = run.reward.range
        print("prompt tracker: rewards mapped to [0, 1] from " + (
            f"the fixed range [{tracked[0]:g}, {tracked[1]:g}] of --reward={cfg.reward}" if tracked
            else "the running min..max seen (this reward mix declares no range)"))


def train_loop(run, state, start, log, evaluated, save):
    """The RL iterations, from a fresh run's evaluation of the base model at iteration 0 -> (None, or the
    Ended that stopped them on every rank together; the newest saved iteration). Rank 0 copies the
    state after each iteration, so what it saves on an Ended is the last completed one: an iteration
    cut short in its sampling or its optimisation leaves no trace."""
    cfg, ranks = run.cfg, run.ranks
    completed, saved, bad_steps = checkpoint.capture(state, start) if ranks.master else None, start, 0
    try:
        if start == 0:
            with together(ranks):
                log(0, evaluated(0), redraw=True)
        for it in tqdm(range(start, cfg.iters), disable=not ranks.master, desc="RL iterations"):
            with together(ranks):
                traj, cond, adv, logs = sample_and_score(run, it, state.tracker)
                timer, done, worst = time.perf_counter(), it + 1, 0
                logs.update(optimise(run, it, state, traj, cond, adv), seconds_training=time.perf_counter() - timer)
                if ranks.device.type == "cuda":  # the run's peak so far, for sd35/bench.py --trainer
                    logs["peak_memory_bytes"] = torch.cuda.max_memory_allocated(ranks.device)
                for skipped in logs["skipped_steps"]:
                    if state.ema and not skipped:
                        state.ema.step()
                    bad_steps = bad_steps + 1 if skipped else 0
                    worst = max(worst, bad_steps)
                completed = checkpoint.capture(state, done) if ranks.master else None
                evaluating = (cfg.eval_every and done % cfg.eval_every == 0) or done == cfg.iters
                try:
                    logs.update(evaluated(done) if evaluating else {})
                finally:  # an iteration that trained is logged, with its evaluation or without
                    log(done, logs, redraw=evaluating)
                if worst >= cfg.max_bad_steps:  # the iteration ran (its updates skipped): it counts as done
                    raise RunError(f"{cfg.max_bad_steps} optimiser steps in a row had a NaN or infinite gradient (all "
                                   "skipped); lower --lr, or check the rewards and --mixed_precision")
                if ranks.master and ((cfg.save_every and done % cfg.save_every == 0) or done == cfg.iters):
                    saved = save(completed)
    except Ended as ended:
        if ranks.master and completed.iteration > saved:  # keep the iterations not yet in a checkpoint
            try:
                saved = save(completed)
            except OSError as error:  # a failed write ends even a stop as a failure
                ended = Ended(" ".join(str(error).split())) if ended.signal else ended
        return ended, saved
    return None, saved


def main(argv):
    try:
        cfg, algo, train_prompts, test_prompts, ranks, resume_from, start, identity = check_before_loading(argv)
        ranks.start()
    except (ValueError, OSError, RuntimeError) as error:  # RuntimeError: a device or process group that fails
        sys.exit(f"error: {' '.join(str(error).split())}")
    for sig in (signal.SIGINT, signal.SIGTERM):  # a stop is only noted here; the ranks act on it together
        signal.signal(sig, lambda signum, frame: setattr(ranks, "stop_signal", signum))
    out, run, log = Path(cfg.out), None, None
    kept = None if cfg.eval_only else start if resume_from else -1  # earlier log lines kept: up to it (-1: none)
    ended, saved = None, start
    try:
        with together(ranks):  # the tracker first, so that it records any failure from here on
            log = curves.RunLog(out / "log.jsonl", ranks.master,
                                curves.Mirror(cfg.report_to if ranks.master else "none", out, asdict(cfg), kept), kept)
            run, state = build(cfg, algo, train_prompts, test_prompts, ranks)
            if resume_from:
                checkpoint.load(resume_from, state, identity, evaluated_only=cfg.eval_only)
            if ranks.master:
                describe_run(run, state, start)

        def evaluated(it):
            with state.ema.applied() if state.ema else nullcontext():
                logs = evaluate(run, it, out, log.mirror)
            if cfg.keep_best and ranks.master and not cfg.eval_only:
                checkpoint.keep_best(out, state, it, logs["eval_reward"])
            return logs

        if cfg.eval_only:
            with together(ranks):
                log(start, evaluated(start), redraw=True)
        else:
            ended, saved = train_loop(run, state, start, log, evaluated,
                                      lambda snapshot: checkpoint.save(out, snapshot, identity, cfg.keep_checkpoints))
    except Ended as error:
        ended = error
    finish(ranks, run, log, ended, saved)


def finish(ranks, run, log, ended, saved):
    """Say how the run ended (a stop first: its checkpoint is saved), stop the workers, check that the
    ranks agree, close the tracker; a failure exits 1."""
    newest = f"iteration {saved}" if saved else "none"
    if ranks.master and ended is not None and ended.signal:
        print(f"stopped by signal {ended.signal} after iteration {saved}; newest checkpoint: {newest}")
    if run:
        run.reward.close()  # the scoring workers, now rather than at interpreter exit
    if ranks.distributed:
        if ended is None:
            flat = torch.cat([p.detach().flatten().cpu() for p in run.pipe.transformer.parameters() if p.requires_grad])
            log(None, {"ranks_in_sync": bool((ranks.gather(flat[None]) == flat).all())})
        dist.destroy_process_group()
    failure = str(ended) if ended is not None and not ended.signal else None
    if log:
        if failure is not None:
            with suppress(OSError):  # the folder that failed a write may fail this one: the line below says all
                log(None, {"error": failure})
        log.mirror.close(failure)
    if failure is not None:
        if ranks.master:
            print(f"error: {failure} (newest checkpoint: {newest})", file=sys.stderr)
        sys.exit(1)


if __name__ == "__main__":
    main(sys.argv[1:])
