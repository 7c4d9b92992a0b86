"""Fine-tune the 2D toy flow with Flow-GRPO, Stepwise-Flow-GRPO, SuperFlow and mixes of them.

    python toy/train.py                                  # all presets, 3 seeds, figures in runs/toy
    python toy/train.py --algos=flow_grpo,superflow --seeds=0 --iters=30
    python toy/train.py --algos=stepwise:group_sizes=variance --out=runs/mix

Every algorithm gets the same hyperparameters and the same number of sampled trajectories
per iteration; they differ only along minflow's axes (an `--algos` entry is a preset name,
optionally with `:axis=value` overrides). Prints a results table and writes
OUT/results.json and PNG figures (see toy/plots.py).
"""
import copy
import json
import sys
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import minflow  # noqa: E402
from toy import flow, plots  # noqa: E402


@dataclass
class Config:
    algos: str = "flow_grpo,stepwise,superflow,stepwise:sampler=flow_grpo,stepwise:group_sizes=variance,superflow:n_min=8"  # presets and mixes; the first is the baseline
    seeds: str = "0,1,2,3,4"  # one RL run per algorithm and seed
    iters: int = 100  # RL iterations per run
    trajectories: int = 128  # sampled trajectories per iteration, the same for every algorithm
    num_steps: int = 10  # denoising steps while sampling for training (SD3 grid)
    shift: float = 3.0  # time shift of the grid, as SD3.5
    eval_steps: int = 20  # ODE steps for evaluation
    eval_every: int = 5  # iterations between evaluations
    eval_samples: int = 64  # evaluation samples per prompt, from fixed noise
    lr: float = 1e-3  # AdamW learning rate (1e-3 beat 3e-3 for Flow-GRPO; see README)
    minibatches: int = 4  # optimiser steps per iteration, each over a share of the transitions
    clip_range: float = 0.05  # PPO clip; larger than SD3's 1e-4 because log-probs average 2 dims, not 65k
    beta: float = 0.0  # KL weight to the base model (0: no reference forward)
    grad_clip: float = 1.0  # gradient-norm clip
    out: str = "runs/toy"  # folder for results.json and the figures


def evaluate(model, sigmas, noise, prompts):
    """Mean reward of deterministic (ODE) samples from fixed noise; returns (reward, samples)."""
    traj = minflow.rollout(lambda x, t: model(x, t, prompts), noise, sigmas, sampler="ode")
    x = traj.xs[:, -1]
    return flow.reward(x, prompts).mean().item(), x


def gain_profile(model, algo, sigmas, prompts, generator):
    """Mean |gain| per step of the algorithm's sampler, from short-ODE intermediate rewards."""
    velocity = lambda x, t: model(x, t, prompts)  # noqa: E731
    sizes = torch.bincount(prompts)
    traj = minflow.rollout(velocity, minflow.initial_noise(sizes, (2,), algo.shared_noise, generator), sigmas,
                           algo.sampler, algo.noise_level, generator)
    r = minflow.step_rewards(lambda x, t, rows: model(x, t, prompts[rows]), traj,
                             lambda x0, rows: flow.reward(x0, prompts[rows]), algo.substeps)
    return (r[:, 1:] - r[:, :-1]).abs().mean(0).tolist()


def train(base, algo, cfg, seed, progress):
    """One RL run; returns its evaluation curve, group sizes and timings."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model, ref = copy.deepcopy(base).train(), base
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sigmas = minflow.sd3_sigmas(cfg.num_steps, cfg.shift)
    eval_sigmas = minflow.sd3_sigmas(cfg.eval_steps, cfg.shift)
    eval_prompts = torch.arange(flow.NUM_PROMPTS).repeat_interleave(cfg.eval_samples)
    eval_noise = torch.randn(len(eval_prompts), 2, generator=torch.Generator().manual_seed(1234))
    prompts = torch.arange(flow.NUM_PROMPTS)
    tracker = minflow.new_tracker(algo, flow.NUM_PROMPTS)
    base_score = evaluate(model, eval_sigmas, eval_noise, eval_prompts)[0]
    curve, clock = [[0, base_score]], [[0.0, base_score]]  # reward vs trajectories, vs training seconds
    sizes_log, zero_std, elapsed = [], [], 0.0
    for it in range(cfg.iters):
        start = time.perf_counter()
        sizes = minflow.group_sizes(algo, len(prompts), cfg.trajectories, tracker, prompts)
        group_ids = torch.repeat_interleave(torch.arange(len(prompts)), sizes)
        labels = prompts[group_ids]
        velocity = lambda x, t: model(x, t, labels)  # noqa: E731
        with torch.no_grad():
            x1 = minflow.initial_noise(sizes, (2,), algo.shared_noise, gen)
            traj = minflow.rollout(velocity, x1, sigmas, algo.sampler, algo.noise_level, gen)
            rewards = flow.reward(traj.xs[:, -1], labels)
            step_r = None
            if algo.step_credit == "gains":
                step_r = minflow.step_rewards(lambda x, t, rows: model(x, t, labels[rows]), traj,
                                               lambda x0, rows: flow.reward(x0, labels[rows]), algo.substeps, rewards,
                                               minflow.needed_states(traj.stds), group_ids if algo.shared_noise else None)
        baseline = tracker.baseline(labels) if algo.baseline == "tracker" else None
        adv = minflow.advantages(algo, rewards, group_ids, traj.stds, step_r, baseline)
        if tracker is not None:
            tracker.update(labels, rewards)
        rows = minflow.transitions(traj, adv)
        order = torch.randperm(len(rows["advantage"]), generator=gen)
        for chunk in order.chunk(cfg.minibatches):
            chunk_labels = labels[rows["sample"][chunk]]
            loss, _ = minflow.policy_loss(
                lambda x, t: model(x, t, chunk_labels), rows["x"][chunk], rows["x_next"][chunk], rows["t"][chunk],
                rows["t_next"][chunk], rows["old_log_prob"][chunk], rows["advantage"][chunk], algo.sampler,
                algo.noise_level, cfg.clip_range, cfg.beta, lambda x, t: ref(x, t, chunk_labels))
            opt.zero_grad(set_to_none=True)
            loss.backward()
            torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
            opt.step()
        elapsed += time.perf_counter() - start
        sizes_log.append(sizes.tolist())
        zero_std.append(minflow.zero_std_fraction(rewards, group_ids))
        if (it + 1) % cfg.eval_every == 0 or it + 1 == cfg.iters:
            score = evaluate(model, eval_sigmas, eval_noise, eval_prompts)[0]
            curve.append([(it + 1) * cfg.trajectories, score])
            clock.append([elapsed, score])
        progress.update(1)
    samples = evaluate(model, eval_sigmas, eval_noise, eval_prompts)[1]
    return {"curve": curve, "clock": clock, "group_sizes": sizes_log, "zero_std_ratio": zero_std,
            "seconds": elapsed, "samples": samples.tolist(), "model": model}


def trajectories_to_reach(curves, target):
    """First trajectory count at which the seed-mean curve reaches `target` (None if never)."""
    points = [list(zip(*c)) for c in curves.values()]
    counts, rewards = points[0][0], torch.tensor([p[1] for p in points]).mean(0)
    hit = (rewards >= target).nonzero()
    return counts[int(hit[0])] if len(hit) else None


def main(argv):
    try:
        cfg = Config(**cli.parse_flags(Config, argv))
        names = cfg.algos.split(",")
        algos = {name: minflow.make_algorithm(name) for name in names}
        if not all(s.strip().isdigit() for s in cfg.seeds.split(",")):
            raise ValueError(f"bad --seeds {cfg.seeds!r}; expected comma-separated integers like 0,1,2")
        seeds = [int(s) for s in cfg.seeds.split(",")]
    except ValueError as e:
        sys.exit(f"error: {e}")
    out = Path(cfg.out)
    out.mkdir(parents=True, exist_ok=True)

    base = flow.pretrain()
    sigmas = minflow.sd3_sigmas(cfg.num_steps, cfg.shift)
    results = {"config": asdict(cfg), "curves": {}, "clock": {}, "seconds": {}, "group_sizes": {}, "zero_std_ratio": {},
               "gains": {"base": {}, "trained": {}}, "samples": {}}
    with tqdm(total=len(algos) * len(seeds) * cfg.iters, desc="RL iterations") as progress:
        for name, algo in algos.items():
            runs = {seed: train(base, algo, cfg, seed, progress) for seed in seeds}
            for key in ("curve", "clock", "seconds", "group_sizes", "zero_std_ratio"):
                results["curves" if key == "curve" else key][name] = {s: r[key] for s, r in runs.items()}
            results["samples"][name] = runs[seeds[0]]["samples"]
            profile = lambda model: gain_profile(  # noqa: E731
                model, algo, sigmas, torch.arange(flow.NUM_PROMPTS).repeat_interleave(64), torch.Generator().manual_seed(0))
            results["gains"]["trained"][name] = profile(runs[seeds[0]]["model"])
            results["gains"]["base"][f"{algo.sampler}, shared noise={algo.shared_noise}"] = profile(base)
    eval_prompts = torch.arange(flow.NUM_PROMPTS).repeat_interleave(cfg.eval_samples)
    eval_noise = torch.randn(len(eval_prompts), 2, generator=torch.Generator().manual_seed(1234))
    results["samples"]["base"] = evaluate(base, minflow.sd3_sigmas(cfg.eval_steps, cfg.shift), eval_noise, eval_prompts)[1].tolist()
    results["eval_prompts"] = eval_prompts.tolist()
    results["table"] = summarise(results, names[0])
    print_table(results["table"], names[0])
    cli.atomic_write(out / "results.json", json.dumps(results).encode())
    for path in plots.all_figures(results, out):
        print(f"wrote {path}")


def summarise(results, baseline):
    """Per algorithm: final reward mean and spread over seeds; trajectories to reach the
    baseline's final mean reward and to reach halfway there from the base model (each also
    as a ratio to the baseline's own count); seconds per run and per iteration."""
    finals = {name: torch.tensor([c[-1][1] for c in curves.values()]) for name, curves in results["curves"].items()}
    target = finals[baseline].mean().item()
    start = next(iter(results["curves"][baseline].values()))[0][1]
    targets = {"final": target, "half": (start + target) / 2}
    base_counts = {k: trajectories_to_reach(results["curves"][baseline], v) for k, v in targets.items()}
    table = {}
    for name, curves in results["curves"].items():
        seconds = torch.tensor(list(results["seconds"][name].values()))
        row = {"base_reward": start, "final_mean": finals[name].mean().item(),
               "final_std": finals[name].std(unbiased=False).item(), "seconds_per_run": seconds.mean().item(),
               "seconds_per_iter": seconds.mean().item() / results["config"]["iters"]}
        for k, v in targets.items():
            count = trajectories_to_reach(curves, v)
            row[f"trajectories_to_{k}"] = count
            # No ratio when the baseline reached the target at once (count 0) or never.
            row[f"ratio_to_{k}"] = count / base_counts[k] if count is not None and base_counts[k] else None
        table[name] = row
    return table


def print_table(table, baseline):
    print(f"\n{'algorithm':<30} {'final reward':>15} {'traj. to halfway':>17} {'traj. to ' + baseline + ' final':>25}"
          f" {'s/run':>6} {'s/iter':>7}")
    for name, row in table.items():
        reach = ["never" if row[f"trajectories_to_{k}"] is None else f"{row[f'trajectories_to_{k}']}" +
                 ("" if row[f"ratio_to_{k}"] is None else f" ({row[f'ratio_to_{k}']:.2f}x)") for k in ("half", "final")]
        print(f"{name:<30} {row['final_mean']:>7.3f} ± {row['final_std']:.3f} {reach[0]:>17} {reach[1]:>25} "
              f"{row['seconds_per_run']:>6.2f} {row['seconds_per_iter']:>7.3f}")
    print(f"(base model: {next(iter(table.values()))['base_reward']:.3f}; spread = std over seeds; halfway = "
          f"midpoint between the base reward and {baseline}'s final mean)")


if __name__ == "__main__":
    main(sys.argv[1:])
