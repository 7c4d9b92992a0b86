"""Fine-tune the 2D toy flow with Flow-GRPO, Stepwise-Flow-GRPO, SuperFlow, their ablations and mixes.

    python toy/train.py                                  # every preset and ablation, seeds 3-7, runs/toy
    python toy/train.py --algos=flow_grpo,superflow --seeds=3 --iters=30
    python toy/train.py --algos=stepwise:group_sizes=bins --tuned=false --out=runs/mix

Every algorithm samples the same number of trajectories per iteration (8 prompts drawn from
the pool of 32, 128 trajectories in all) and gets its own learning rate and noise level from
toy/tuned.json, chosen by `python toy/tune.py` on seeds 0-2 with one grid for all; the main
job reports held-out seeds 3-7. Algorithms differ only along minflow's axes (an `--algos`
entry is a preset name, optionally with `:axis=value` overrides). Prints the results table and
the claims table (toy/claims.py) and writes OUT/results.json and PNG figures (toy/plots.py).
"""
import copy
import json
import re
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import minflow  # noqa: E402
from cli import FlagError, flag  # noqa: E402
from toy import claims, flow, plots  # noqa: E402

DEFAULT_ALGOS = ",".join([
    "flow_grpo", "stepwise", "stepwise:gain_norm=per_step", "stepwise:sampler=flow_grpo", "superflow",
    "superflow_no_dynamic_sampling", "superflow_no_step_credit", "flow_spo",
    "superflow:prompt_sampling=uniform:group_sizes=neyman:tracker=moments",  # the project's first SuperFlow reconstruction
])
TUNED = Path(__file__).resolve().parent / "tuned.json"
MAX_SEED = 2**31 - 1


def parse_algos(value):
    """'flow_grpo,stepwise:sampler=cps' -> {entry: minflow.Algorithm}; FlagError names --algos."""
    entries = [e.strip() for e in value.split(",")]
    try:
        if not all(entries) or len(set(entries)) < len(entries):
            raise FlagError("expected distinct, non-empty comma-separated algorithms")
        return {e: minflow.make_algorithm(e) for e in entries}
    except FlagError as e:
        raise FlagError(f"--algos={value}: {e}") from None


def algos_range(value):
    """Declared range of --algos (a function, see cli.check_flags)."""
    if value is None:
        return f"comma-separated algorithms: presets ({', '.join(minflow.PRESETS)}), each with optional :axis=value"
    try:
        parse_algos(value)
    except (FlagError, AttributeError) as e:  # AttributeError: not a string
        return str(e)
    return None


def seeds_range(value):
    """Declared range of --seeds: distinct non-negative integers, comma-separated."""
    if value is None:
        return f"comma-separated distinct integers in [0, {MAX_SEED}], like 3,4,5"
    parts = [p.strip() for p in value.split(",")] if isinstance(value, str) else [""]
    if not all(re.fullmatch(r"[0-9]{1,10}", p) for p in parts):
        return seeds_range(None)
    seeds = [int(p) for p in parts]
    return None if max(seeds) <= MAX_SEED and len(set(seeds)) == len(seeds) else seeds_range(None)


def folder_range(value):
    """Declared range of --out: a folder path (created when the job starts, not by the check)."""
    if value is None:
        return "a folder path, not empty and not an existing file"
    ok = isinstance(value, str) and value.strip() and "\0" not in value and not Path(value).is_file()
    return None if ok else folder_range(None)


@dataclass(frozen=True)
class Config:
    algos: str = flag(DEFAULT_ALGOS, algos_range)  # presets and mixes; the first is the baseline of the tables
    seeds: str = flag("3,4,5,6,7", seeds_range)  # one RL run per algorithm and seed; 0-2 are the tuning seeds
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
    clip_range: float = flag(0.05, "(0, 10]")  # PPO clip; larger than SD3's 1e-4: log-probs average 2 dims, not 65k
    beta: float = flag(0.0, "[0, 100]")  # KL weight to the base model (0: no reference forward)
    grad_clip: float = flag(1.0, "(0, 1000000]")  # gradient-norm clip
    out: str = flag("runs/toy", folder_range)  # folder for results.json and the figures

    RELATIONS = (
        ("trajectories", lambda c: c.trajectories % c.prompts_per_iter == 0 and c.trajectories >= 2 * c.prompts_per_iter,
         "a multiple of --prompts_per_iter={prompts_per_iter} and at least twice it (every group needs 2 samples)"),
    )

    def __post_init__(self):
        check_config(self)


def check_config(cfg):
    """Every check that can fail, before any work: each field's declared range, the relations
    between fields, and what each --algos entry needs from them. Raises FlagError (one line)."""
    # --algos first, for a message that names the entry and the axis at fault; a non-string
    # value is left to check_flags, which checks every field's range and the RELATIONS.
    algos = parse_algos(cfg.algos) if isinstance(cfg.algos, str) else None
    cli.check_flags(cfg)
    budget, k = cfg.trajectories, cfg.prompts_per_iter
    for entry, algo in algos.items():
        if algo.group_sizes == "neyman" and algo.n_min * k > budget:
            raise FlagError(f"--algos={cfg.algos}: {entry}: --n_min={algo.n_min} times --prompts_per_iter={k} "
                            f"exceeds --trajectories={budget}; expected at most {budget // k}")
        if algo.group_sizes == "neyman" and 0 < algo.n_max and algo.n_max * k < budget:
            raise FlagError(f"--algos={cfg.algos}: {entry}: --n_max={algo.n_max} times --prompts_per_iter={k} is "
                            f"below --trajectories={budget}; expected 0 or at least {-(-budget // k)}")
    return algos


def tuned_settings(cfg, algos, path=TUNED):
    """Each entry's (lr, noise_level, source): from the tuning file when --tuned and it covers
    the entry, else --lr and the entry's own noise level."""
    chosen = {}
    if cfg.tuned:
        try:
            chosen = json.loads(Path(path).read_text())["chosen"]
        except (OSError, ValueError, KeyError) as e:
            raise FlagError(f"--tuned=true: cannot read {path} ({e}); run python toy/tune.py or pass --tuned=false") from None
    settings = {}
    for entry, algo in algos.items():
        if entry in chosen:
            try:
                settings[entry] = {"lr": replace(cfg, lr=chosen[entry]["lr"]).lr, "source": "tuned",
                                   "noise_level": replace(algo, noise_level=chosen[entry]["noise_level"]).noise_level}
            except (FlagError, KeyError, TypeError) as e:
                raise FlagError(f"--tuned=true: {path} has a bad setting for {entry} ({e})") from None
        else:
            settings[entry] = {"lr": cfg.lr, "noise_level": algo.noise_level, "source": "--lr" if cfg.tuned else "untuned"}
    return settings


# ----------------------------------------------------------------------------------
# One RL run


class Evaluation:
    """Deterministic (ODE) samples of the whole pool from fixed noise, and their rewards."""

    def __init__(self, cfg):
        self.sigmas = minflow.sd3_sigmas(cfg.eval_steps, cfg.shift)
        self.prompts = torch.arange(flow.NUM_PROMPTS).repeat_interleave(cfg.eval_samples)
        self.noise = torch.randn(len(self.prompts), 2, generator=torch.Generator().manual_seed(1234))

    def __call__(self, model):
        """-> (mean reward, each pool prompt's mean reward, the samples)."""
        x = minflow.rollout(lambda x, t: model(x, t, self.prompts), self.noise, self.sigmas, sampler="ode").xs[:, -1]
        r = flow.reward(x, self.prompts)
        return r.mean().item(), r.view(flow.NUM_PROMPTS, -1).mean(1).tolist(), x


def optimise(model, ref, opt, traj, adv, labels, algo, cfg, gen):
    """The iteration's optimiser steps over its transitions with nonzero advantage."""
    rows = minflow.transitions(traj, adv)
    if len(rows["advantage"]) == 0:
        return
    for chunk in torch.randperm(len(rows["advantage"]), generator=gen).chunk(cfg.minibatches):
        chunk_labels = labels[rows["sample"][chunk]]
        loss, _ = minflow.policy_loss(
            lambda x, t: model(x, t, chunk_labels), rows["x"][chunk], rows["x_next"][chunk], rows["t"][chunk],
            rows["t_next"][chunk], rows["old_log_prob"][chunk], rows["advantage"][chunk], algo.sampler,
            algo.noise_level, cfg.clip_range, cfg.beta, lambda x, t: ref(x, t, chunk_labels))
        opt.zero_grad(set_to_none=True)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(model.parameters(), cfg.grad_clip)
        opt.step()


def train(base, algo, cfg, seed, progress=None, evaluation=None):
    """One RL run from the base model -> its evaluation curves, per-iteration logs and model."""
    torch.manual_seed(seed)
    gen = torch.Generator().manual_seed(seed)
    model = copy.deepcopy(base).train()
    opt = torch.optim.AdamW(model.parameters(), lr=cfg.lr, weight_decay=1e-4)
    sigmas = minflow.sd3_sigmas(cfg.num_steps, cfg.shift)
    evaluate = evaluation or Evaluation(cfg)
    tracker = minflow.new_tracker(algo, flow.NUM_PROMPTS, (0.0, 1.0))
    score, per_prompt, samples = evaluate(model)
    log = {"curve": [[0, score]], "clock": [[0.0, score]], "prompts": [], "group_sizes": [], "zero_std_ratio": [],
           "train_reward": []}
    elapsed = 0.0
    for it in range(cfg.iters):
        start = time.perf_counter()
        prompt_ids = minflow.choose_prompts(algo, flow.NUM_PROMPTS, cfg.prompts_per_iter, tracker, gen)
        sizes = minflow.group_sizes(algo, len(prompt_ids), cfg.trajectories, tracker, prompt_ids)
        group_ids = torch.repeat_interleave(torch.arange(len(prompt_ids)), sizes)
        labels = prompt_ids[group_ids]
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
        # The tracker's value from before this iteration's update, so the baseline does not
        # depend on the rewards it is subtracted from.
        baseline = tracker.baseline(labels) if algo.baseline == "tracker" else None
        if minflow.trained_steps(traj.stds).any():  # a noiseless grid has nothing to train
            adv = minflow.advantages(algo, rewards, group_ids, traj.stds, step_r, baseline)
            optimise(model, base, opt, traj, adv, labels, algo, cfg, gen)
        if tracker is not None:
            tracker.update(labels, rewards)
        elapsed += time.perf_counter() - start
        log["prompts"].append(prompt_ids.tolist())
        log["group_sizes"].append(sizes.tolist())
        log["zero_std_ratio"].append(minflow.zero_std_fraction(rewards, group_ids))
        log["train_reward"].append(rewards.mean().item())
        if (it + 1) % cfg.eval_every == 0 or it + 1 == cfg.iters:
            score, per_prompt, samples = evaluate(model)
            log["curve"].append([(it + 1) * cfg.trajectories, score])
            log["clock"].append([elapsed, score])
        if progress is not None:
            progress.update(1)
    log.update(seconds=elapsed, model=model, per_prompt=per_prompt, samples=samples.tolist())  # of the last evaluation
    return log


def gain_profile(model, algo, sigmas, generator):
    """Mean |gain| per step of the algorithm's sampler over the pool, from short-ODE rewards."""
    prompts = torch.arange(flow.NUM_PROMPTS).repeat_interleave(16)
    velocity = lambda x, t: model(x, t, prompts)  # noqa: E731
    traj = minflow.rollout(velocity, minflow.initial_noise(torch.bincount(prompts), (2,), algo.shared_noise, generator),
                           sigmas, algo.sampler, algo.noise_level, generator)
    r = minflow.step_rewards(lambda x, t, rows: model(x, t, prompts[rows]), traj,
                             lambda x0, rows: flow.reward(x0, prompts[rows]), algo.substeps)
    return (r[:, 1:] - r[:, :-1]).abs().mean(0).tolist()


# ----------------------------------------------------------------------------------
# The main job


def run_all(cfg, algos, settings, base, seeds):
    """Every algorithm x seed -> results (curves, logs, samples, gain profiles)."""
    sigmas = minflow.sd3_sigmas(cfg.num_steps, cfg.shift)
    evaluation = Evaluation(cfg)
    results = {"config": asdict(cfg), "settings": settings, "curves": {}, "clock": {}, "seconds": {}, "prompts": {},
               "group_sizes": {}, "zero_std_ratio": {}, "train_reward": {}, "per_prompt": {},
               "gains": {"base": {}, "trained": {}}, "samples": {}}
    with tqdm(total=len(algos) * len(seeds) * cfg.iters, desc="RL iterations", mininterval=2) as progress:
        for name, algo in algos.items():
            algo = replace(algo, noise_level=settings[name]["noise_level"])
            run_cfg = replace(cfg, lr=settings[name]["lr"])
            runs = {seed: train(base, algo, run_cfg, seed, progress, evaluation) for seed in seeds}
            for key in ("curve", "clock", "seconds", "prompts", "group_sizes", "zero_std_ratio", "train_reward"):
                results["curves" if key == "curve" else key][name] = {s: r[key] for s, r in runs.items()}
            results["samples"][name] = runs[seeds[0]]["samples"]
            results["per_prompt"][name] = {s: r["per_prompt"] for s, r in runs.items()}
            results["gains"]["trained"][name] = gain_profile(runs[seeds[0]]["model"], algo, sigmas,
                                                             torch.Generator().manual_seed(0))
            key = f"{algo.sampler} a={algo.noise_level:g}, shared noise={algo.shared_noise}"
            results["gains"]["base"][key] = gain_profile(base, algo, sigmas, torch.Generator().manual_seed(0))
    _, results["per_prompt"]["base"], samples = evaluation(base)
    results["samples"]["base"] = samples.tolist()
    results["eval_prompts"] = evaluation.prompts.tolist()
    results["own_mode_weights"] = flow.own_mode_weights().tolist()
    return results


def setup(argv):
    """Flags -> (config, algorithms, their settings), or exit with one line before any work."""
    try:
        cfg = Config(**cli.parse_flags(Config, argv))  # checked on construction (check_config)
        algos = parse_algos(cfg.algos)
        return cfg, algos, tuned_settings(cfg, algos)
    except FlagError as e:
        sys.exit(f"error: {e}")


def main(argv):
    cfg, algos, settings = setup(argv)
    out = Path(cfg.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        sys.exit(f"error: --out={cfg.out}: cannot create the folder ({e.strerror})")
    # The toy's tensors are small: one thread is as fast, and far faster on a busy machine.
    torch.set_num_threads(1)
    seeds = [int(s) for s in cfg.seeds.split(",")]
    started = time.perf_counter()
    base = flow.pretrain()
    results = run_all(cfg, algos, settings, base, seeds)
    results["samplers"] = claims.sampler_rewards(base, cfg, results["settings"])
    names = list(algos)
    results["table"] = summarise(results, names[0])
    results["claims"] = claims.evaluate(results)
    results["wall_seconds"] = time.perf_counter() - started
    print_table(results["table"], names[0], settings)
    claims.print_claims(results["claims"])
    cli.atomic_write(out / "results.json", json.dumps(results).encode())
    for path in plots.all_figures(results, out):
        print(f"wrote {path}")
    print(f"{results['wall_seconds']:.0f} s wall-clock (pretraining included if it ran)")


def summarise(results, baseline):
    """Per algorithm: final reward mean and spread over seeds; trajectories to reach the
    baseline's final mean reward and to reach halfway there from the base model (each also
    as a ratio to the baseline's own count); share of zero-variance groups; seconds."""
    finals = {name: torch.tensor([c[-1][1] for c in curves.values()]) for name, curves in results["curves"].items()}
    target = finals[baseline].mean().item()
    start = next(iter(results["curves"][baseline].values()))[0][1]
    targets = {"final": target, "half": (start + target) / 2}
    base_counts = {k: claims.trajectories_to_reach(results["curves"][baseline], v) for k, v in targets.items()}
    table = {}
    for name, curves in results["curves"].items():
        seconds = torch.tensor(list(results["seconds"][name].values()))
        zero_std = torch.tensor([sum(z) / len(z) for z in results["zero_std_ratio"][name].values()])
        row = {"base_reward": start, "final_mean": finals[name].mean().item(),
               "final_std": finals[name].std().item() if len(finals[name]) > 1 else 0.0,  # sample std, as the claims
               "zero_std_ratio": zero_std.mean().item(), "seconds_per_run": seconds.mean().item(),
               "seconds_per_iter": seconds.mean().item() / results["config"]["iters"],
               "lr": results["settings"][name]["lr"], "noise_level": results["settings"][name]["noise_level"],
               "setting": results["settings"][name]["source"]}
        for k, v in targets.items():
            count = claims.trajectories_to_reach(curves, v)
            row[f"trajectories_to_{k}"] = count
            # No ratio when the baseline reached the target at once (count 0) or never.
            row[f"ratio_to_{k}"] = count / base_counts[k] if count is not None and base_counts[k] else None
        table[name] = row
    return table


def print_table(table, baseline, settings):
    width = max(len(n) for n in table) + 1
    print(f"\n{'algorithm':<{width}} {'lr':>6} {'a':>4} {'final reward':>15} {'traj. to halfway':>17} "
          f"{'traj. to ' + baseline + ' final':>25} {'zero-std':>8} {'s/run':>6}")
    for name, row in table.items():
        reach = ["never" if row[f"trajectories_to_{k}"] is None else f"{row[f'trajectories_to_{k}']}" +
                 ("" if row[f"ratio_to_{k}"] is None else f" ({row[f'ratio_to_{k}']:.2f}x)") for k in ("half", "final")]
        print(f"{name:<{width}} {row['lr']:>6.0e} {row['noise_level']:>4.2g} {row['final_mean']:>7.3f} ± "
              f"{row['final_std']:.3f} {reach[0]:>17} {reach[1]:>25} {100 * row['zero_std_ratio']:>7.1f}% "
              f"{row['seconds_per_run']:>6.2f}")
    sources = sorted({s["source"] for s in settings.values()})
    print(f"(base model: {next(iter(table.values()))['base_reward']:.3f}; ± = std over seeds; halfway = midpoint "
          f"between the base reward and {baseline}'s final mean; zero-std = share of groups whose rewards were all "
          f"equal; lr and a from: {', '.join(sources)})")


if __name__ == "__main__":
    main(sys.argv[1:])
