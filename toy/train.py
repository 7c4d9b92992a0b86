"""The main job: Flow-GRPO, Stepwise-Flow-GRPO (on both SDEs) and SuperFlow on the 2D toy flow.

    python toy/train.py                                  # the four presets, held-out seeds 3-7, runs/toy
    python toy/train.py --reward=hit                     # the 0/1 success reward instead of the bump
    python toy/train.py --algos=stepwise:group_sizing=bins --tuned=false --seeds=3 --iters=30

Every algorithm samples the same trajectories per iteration (8 prompts from the pool of 32, 128
trajectories) at its own lr and noise level from toy/tuned.json (python toy/tune.py, per reward,
tuning seeds 0-2). An --algos entry is a preset, optionally with :axis=value overrides. Prints
the table, writes OUT/results.json and PNG figures. Every preset and ablation on both rewards,
with the papers' claims: python toy/study.py.
"""
import copy
import json
import multiprocessing
import os
import re
import sys
import time
from concurrent.futures import ProcessPoolExecutor
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import minflow  # noqa: E402
from cli import FlagError, flag  # noqa: E402
from toy import flow, plots  # noqa: E402

DEFAULT_ALGOS = "flow_grpo,stepwise,stepwise_ddim,superflow"
WORKERS = min(8, os.cpu_count() or 1)  # runs are independent and single-threaded: one per core
TUNED = Path(__file__).resolve().parent / "tuned.json"


def parse_algos(value):
    """'flow_grpo,stepwise:sampler=cps' -> {entry: minflow.Algorithm}; FlagError names --algos."""
    entries = [e.strip() for e in value.split(",")]
    try:
        if not all(entries) or len(set(entries)) < len(entries):
            raise FlagError("expected distinct, non-empty comma-separated algorithms")
        return {e: cli.make_algorithm(e) for e in entries}
    except FlagError as e:
        raise FlagError(f"--algos={value}: {e}") from None


algos_range = cli.text_range(f"comma-separated algorithms: presets ({', '.join(minflow.PRESETS)}), each with "
                             "optional :axis=value", lambda v: isinstance(v, str) and cli.parses(parse_algos)(v))


def _distinct_seeds(value):
    parts = [p.strip() for p in value.split(",")]
    return all(re.fullmatch(r"[0-9]{1,9}", p) for p in parts) and len(set(map(int, parts))) == len(parts)


seeds_range = cli.text_range("comma-separated distinct integers in [0, 999999999], like 3,4,5",
                             lambda v: isinstance(v, str) and _distinct_seeds(v))
folder_range = cli.text_range("a folder path, not empty and not an existing file", lambda v: isinstance(v, str) and
                              bool(v.strip()) and "\0" not in v and not Path(v).is_file())


@dataclass(frozen=True)
class Config:
    algos: str = flag(DEFAULT_ALGOS, algos_range)  # presets and mixes; the first is the baseline of the table
    seeds: str = flag("3,4,5,6,7", seeds_range)  # one RL run per algorithm and seed; 0-2 are the tuning seeds
    reward: str = flag("bump", flow.REWARDS)  # the toy reward: continuous bump, or 0/1 hit within a radius
    tuned: bool = flag(True, (False, True))  # take each algorithm's lr and noise level from toy/tuned.json
    iters: int = flag(100, "[1, 100000]")  # RL iterations per run
    prompts_per_iter: int = flag(8, f"[1, {flow.NUM_PROMPTS}]")  # prompts drawn from the pool each iteration
    trajectories: int = flag(128, "[2, 4096]")  # sampled trajectories per iteration, the same for every algorithm
    num_steps: int = flag(10, "[1, 100]")  # denoising steps while sampling for training (SD3 grid)
    shift: float = flag(3.0, "[0.1, 10]")  # time shift of the grid, as SD3.5
    eval_steps: int = flag(20, "[1, 200]")  # ODE steps for evaluation
    eval_every: int = flag(5, "[1, 100000]")  # iterations between evaluations
    eval_samples: int = flag(32, "[1, 1024]")  # evaluation samples per pool prompt, from fixed noise
    lr: float = flag(1e-3, "(0, 1]")  # AdamW learning rate of algorithms that toy/tuned.json does not cover
    minibatches: int = flag(4, "[1, 1024]")  # optimiser steps per iteration, each over a share of the transitions
    clip_range: float = flag(0.05, "(0, 10]")  # PPO clip; wide: the toy's log-probs average two dims, not a latent's many
    beta: float = flag(0.0, "[0, 100]")  # KL weight to the base model (0: no reference forward)
    grad_clip: float = flag(1.0, "(0, 1000000]")  # gradient-norm clip
    workers: int = flag(WORKERS, "[1, 64]")  # worker processes, one run each at a time; results do not depend on it
    out: str = flag("runs/toy", folder_range)  # folder for results.json and the figures

    RELATIONS = (("trajectories", lambda c: c.trajectories % c.prompts_per_iter == 0 and c.trajectories >= 2 *
                  c.prompts_per_iter, "a multiple of --prompts_per_iter={prompts_per_iter} and at least twice it "
                  "(every group needs 2 samples)"),)

    def __post_init__(self):
        """Every check that can fail, before any work: each field's declared range, the relations
        between fields, and that each --algos entry trains some step on the grid. FlagError, one line."""
        # --algos first, for a message that names the entry and the axis at fault.
        algos = parse_algos(self.algos) if isinstance(self.algos, str) else None
        cli.check_flags(self)
        sigmas = minflow.sd3_sigmas(self.num_steps, self.shift)
        for entry, algo in algos.items():
            try:
                minflow.check_trains_something(algo, sigmas)
            except ValueError as e:
                raise FlagError(f"--algos={self.algos}: {entry} trains nothing with --noise_level="
                                f"{algo.noise_level:g}, --ddim_noise={algo.ddim_noise} and "
                                f"--num_steps={self.num_steps} ({e})") from None


def tuned_source(entry, chosen):
    """The tuned entry whose setting `entry` takes: itself, else its preset, else the tuned preset
    its preset is an ablation of (superflow_no_step_credit -> superflow); None if none."""
    preset = entry.split(":")[0]
    family = [k for k in chosen if preset.startswith(k + "_")]
    return entry if entry in chosen else preset if preset in chosen else max(family, key=len, default=None)


def tuned_settings(cfg, algos, path=TUNED):
    """Each entry's (lr, noise_level, source) for --reward: from the tuning file when --tuned
    (an entry that sets its own noise level keeps it), else --lr and the entry's own level."""
    chosen = {}
    if cfg.tuned:
        try:
            chosen = json.loads(Path(path).read_text())["chosen"][cfg.reward]
        except (OSError, ValueError, KeyError, TypeError) as e:  # TypeError: JSON that is not an object
            raise FlagError(f"--tuned=true: cannot read {path} for --reward={cfg.reward} ({e}); run python "
                            "toy/tune.py or pass --tuned=false") from None
    settings = {}
    for entry, algo in algos.items():
        source = tuned_source(entry, chosen)
        settings[entry] = {"lr": cfg.lr, "noise_level": algo.noise_level, "source": "--lr" if cfg.tuned else "untuned"}
        try:
            if source is not None:
                level = algo.noise_level if "noise_level=" in entry else chosen[source]["noise_level"]
                cli.check_flags(replace(algo, noise_level=level))  # a level from the file, checked as a flag
                settings[entry] = {"lr": replace(cfg, lr=chosen[source]["lr"]).lr, "source": f"tuned as {source}",
                                   "noise_level": level}
        except (FlagError, KeyError, TypeError) as e:
            raise FlagError(f"--tuned=true: {path} has a bad setting for {source} ({e})") from None
    return settings


class Evaluation:
    """Deterministic (ODE) samples of the whole pool from fixed noise, and their rewards."""

    def __init__(self, cfg):
        self.sigmas, self.reward = minflow.sd3_sigmas(cfg.eval_steps, cfg.shift), cfg.reward
        self.prompts = torch.arange(flow.NUM_PROMPTS).repeat_interleave(cfg.eval_samples)
        self.noise = torch.randn(len(self.prompts), 2, generator=torch.Generator().manual_seed(1234))

    def __call__(self, model):
        """-> (mean reward, each pool prompt's mean reward, the samples)."""
        x = minflow.rollout(lambda x, t: model(x, t, self.prompts), self.noise, self.sigmas, sampler="ode").xs[:, -1]
        r = flow.reward(x, self.prompts, self.reward)
        return r.mean().item(), r.view(flow.NUM_PROMPTS, -1).mean(1).tolist(), x


def train(base, algo, cfg, seed, progress=None):
    """One RL run from the base model -> its evaluation curves, per-iteration logs and final samples."""
    sigmas = minflow.sd3_sigmas(cfg.num_steps, cfg.shift)
    minflow.check_trains_something(algo, sigmas)
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(base).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)

    def optimiser_step(loss):
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()

    setup = minflow.Setup(lambda x0, prompts: flow.reward(x0, prompts, cfg.reward), flow.NUM_PROMPTS, (2,), sigmas,
                          cfg.prompts_per_iter, cfg.trajectories, cfg.minibatches, cfg.clip_range, cfg.beta)
    evaluate = Evaluation(cfg)
    tracker = minflow.new_tracker(algo, flow.NUM_PROMPTS, (0.0, 1.0))  # both toy rewards lie in [0, 1]
    score, per_prompt, samples = evaluate(model)
    log = {"curves": [[0, score]], "clock": [[0.0, score]], "prompts": [], "group_sizes": [], "zero_std_ratio": []}
    elapsed = 0.0
    for it in range(cfg.iters):
        start = time.perf_counter()
        drawn = minflow.iteration(algo, setup, model, optimiser_step, base, tracker, gen)
        elapsed += time.perf_counter() - start
        log["prompts"].append(drawn["prompt_ids"].tolist())
        log["group_sizes"].append(drawn["group_sizes"].tolist())
        log["zero_std_ratio"].append(drawn["zero_std_ratio"])
        if (it + 1) % cfg.eval_every == 0 or it + 1 == cfg.iters:
            score, per_prompt, samples = evaluate(model)
            log["curves"].append([(it + 1) * cfg.trajectories, score])
            log["clock"].append([elapsed, score])
        if progress is not None:
            progress.update(1)
    return {**log, "seconds": elapsed, "per_prompt": per_prompt, "samples": samples.tolist()}


def _run_in_worker(job):
    """One run in a worker process, from the base model that the parent's pretraining cached on disk."""
    torch.set_num_threads(1)
    return train(flow.pretrain(), *job)


def run_jobs(base, jobs, workers=1, desc="RL iterations"):
    """Each (algorithm, config, seed) job's run log, in order. Each run seeds itself, so the
    logs do not depend on the number of worker processes."""
    with tqdm(total=sum(cfg.iters for _, cfg, _ in jobs), desc=desc, mininterval=2) as progress:
        if workers == 1:
            return [train(base, *job, progress=progress) for job in jobs]
        with ProcessPoolExecutor(workers, multiprocessing.get_context("spawn")) as pool:
            logs = []
            for log, (_, cfg, _) in zip(pool.map(_run_in_worker, jobs), jobs):
                logs.append(log)
                progress.update(cfg.iters)
            return logs


SERIES = ("curves", "clock", "seconds", "prompts", "group_sizes", "zero_std_ratio", "per_prompt")


def jobs_for(cfg, algos, settings, seeds):
    """{(name, seed): the run's (algorithm, config, seed)} at each entry's setting."""
    return {(name, seed): (replace(algo, noise_level=settings[name]["noise_level"]), replace(
        cfg, lr=settings[name]["lr"]), seed) for name, algo in algos.items() for seed in seeds}


def collect(cfg, settings, base, logs):
    """Run logs by (name, seed) -> results: each series by algorithm and seed, the first seed's samples."""
    names, seeds = list(dict.fromkeys(n for n, _ in logs)), list(dict.fromkeys(s for _, s in logs))
    results = {"config": asdict(cfg), "settings": {n: settings[n] for n in names},
               "samples": {n: logs[n, seeds[0]]["samples"] for n in names}}
    for key in SERIES:
        results[key] = {name: {seed: logs[name, seed][key] for seed in seeds} for name in names}
    evaluation = Evaluation(cfg)
    _, results["per_prompt"]["base"], samples = evaluation(base)
    results.update(eval_prompts=evaluation.prompts.tolist(), own_mode_weights=flow.own_mode_weights().tolist())
    results["samples"]["base"] = samples.tolist()
    return results


def seed_mean_reach(curves, target):
    """The first trajectory count at which the seed-mean of {seed: [(count, reward)]} reaches target, else None."""
    mean = torch.tensor([[r for _, r in c] for c in curves.values()]).mean(0).tolist()
    return next((x for (x, _), r in zip(next(iter(curves.values())), mean) if r >= target), None)


def summarise(results, baseline):
    """Per algorithm: final reward (mean, sample std over seeds), trajectories until the seed-mean
    curve reaches halfway from the base model to the baseline's final mean (and as a ratio to the
    baseline's count), share of zero-variance groups, seconds a run, and its setting."""
    finals = {name: torch.tensor([c[-1][1] for c in curves.values()]) for name, curves in results["curves"].items()}
    start = next(iter(results["curves"][baseline].values()))[0][1]
    half = (start + finals[baseline].mean().item()) / 2
    table, base_count = {}, seed_mean_reach(results["curves"][baseline], half)
    for name, curves in results["curves"].items():
        zero_std = [sum(z) / len(z) for z in results["zero_std_ratio"][name].values()]
        count = seed_mean_reach(curves, half)
        table[name] = {"base_reward": start, "final_mean": finals[name].mean().item(),
                       "final_std": finals[name].std().item() if len(finals[name]) > 1 else 0.0,
                       "trajectories_to_half": count, "zero_std_ratio": sum(zero_std) / len(zero_std),
                       # No ratio when the baseline reached halfway at once (count 0) or never.
                       "ratio_to_half": count / base_count if count is not None and base_count else None,
                       "seconds_per_run": sum(results["seconds"][name].values()) / len(results["seconds"][name]),
                       **results["settings"][name]}
    return table


def table_lines(table, baseline):
    """The results table as text lines (the study's too, in its results file)."""
    width = max(len(n) for n in table) + 1
    lines = [f"{'algorithm':<{width}} {'lr':>6} {'a':>4} {'final reward':>15} {'traj. to halfway':>17} "
             f"{'zero-std':>8} {'s/run':>6}"]
    for name, row in table.items():
        count, ratio = row["trajectories_to_half"], row["ratio_to_half"]
        reach = "never" if count is None else f"{count}" + ("" if ratio is None else f" ({ratio:.2f}x)")
        lines.append(f"{name:<{width}} {row['lr']:>6.0e} {row['noise_level']:>4.2g} {row['final_mean']:>7.3f} ± "
                     f"{row['final_std']:.3f} {reach:>17} {100 * row['zero_std_ratio']:>7.1f}% "
                     f"{row['seconds_per_run']:>6.2f}")
    return lines + [f"(base model: {next(iter(table.values()))['base_reward']:.3f}; ± = std over seeds; halfway = "
                    f"midpoint between the base reward and {baseline}'s final mean; zero-std = share of groups whose "
                    f"rewards were all equal; lr and a: {', '.join(sorted({r['source'] for r in table.values()}))})"]


def setup(argv):
    """Flags -> (config, algorithms, their settings), or exit with one line before any work."""
    try:
        cfg = cli.read_flags(Config, argv)  # checked on construction
        algos = parse_algos(cfg.algos)
        return cfg, algos, tuned_settings(cfg, algos)
    except FlagError as e:
        sys.exit(f"error: {e}")


def main(argv):
    cfg, algos, settings = setup(argv)
    out, baseline = Path(cfg.out), next(iter(algos))
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        sys.exit(f"error: --out={cfg.out}: cannot create the folder ({e.strerror})")
    torch.set_num_threads(1)  # the toy's tensors are small: threads cost more than they save
    started = time.perf_counter()
    base = flow.pretrain()
    jobs = jobs_for(cfg, algos, settings, [int(s) for s in cfg.seeds.split(",")])
    logs = dict(zip(jobs, run_jobs(base, list(jobs.values()), min(cfg.workers, len(jobs)))))
    results = collect(cfg, settings, base, logs)
    results["table"], results["wall_seconds"] = summarise(results, baseline), time.perf_counter() - started
    print("\n" + "\n".join(table_lines(results["table"], baseline)))
    cli.atomic_write(out / "results.json", json.dumps(results).encode())
    for path in plots.all_figures(results, out):
        print(f"wrote {path}")
    print(f"{results['wall_seconds']:.0f} s wall-clock (pretraining included if it ran)")


if __name__ == "__main__":
    main(sys.argv[1:])
