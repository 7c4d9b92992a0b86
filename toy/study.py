"""The study: every preset and ablation on both toy rewards, the claims, the axes; writes toy/RESULTS.md.

    python toy/study.py                                  # about half an hour on 2 cores
    python toy/study.py --rewards=hit --axis_study=false --workers=1

Runs each --algos entry at its tuned setting (toy/tuned.json, from python toy/tune.py) on two
disjoint sets of held-out seeds, judges the papers' claims on each set (toy/claims.py), runs
the long runs the late-collapse claim needs and the axis study (single-axis moves between
Flow-GRPO and SuperFlow, on the first seed set), then writes OUT/results.json and, from that
file alone, the results file (--write) with its figures beside it.
"""
import json
import os
import platform
import sys
import time
from dataclasses import asdict, dataclass, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
from cli import FlagError, flag  # noqa: E402
from toy import claims, flow, plots, train, tune  # noqa: E402
from toy.report import report  # noqa: E402

STUDY_ALGOS = ("flow_grpo,stepwise,stepwise:gain_norm=per_step,stepwise_ddim,stepwise_ddim:ddim_noise=posterior,"
               "superflow,superflow:group_min=1,superflow_no_dynamic_sampling,superflow_no_step_credit,flow_spo")
AXIS_ALGOS = ("flow_grpo:prompt_sampling=variance,flow_grpo:group_sizing=bins,flow_grpo:baseline=tracker,"
              "flow_grpo:step_credit=noise,flow_grpo:step_credit=gains,superflow:prompt_sampling=uniform,"
              "superflow:group_sizing=fixed,superflow:baseline=group")
LONG_ALGOS = ("superflow", claims.NO_SAMPLING)  # the late-collapse claim's pair


def tuning_range(value):
    """Declared range of --tuning: an existing JSON file written by toy/tune.py."""
    if value is None:
        return "the path of a file written by python toy/tune.py"
    return None if isinstance(value, str) and value.strip() and (tune.ROOT / value).is_file() else tuning_range(None)


@dataclass(frozen=True)
class StudyConfig:
    algos: str = flag(STUDY_ALGOS, train.algos_range)  # every preset and ablation; each is judged by the claims
    axis_study: bool = flag(True, (False, True))  # also run the single-axis moves of the axis study, first seed set
    rewards: str = flag("bump,hit", tune.values_of(train.Config, "reward", str))  # the toy rewards, each a study
    seeds: str = flag("3,4,5,6,7", train.seeds_range)  # the first set of held-out seeds
    second_seeds: str = flag("8,9,10,11,12", train.seeds_range)  # a disjoint second set, to tell stable verdicts
    iters: int = flag(100, "[1, 100000]")  # RL iterations per run: the main job's and the tuning's budget
    long_iters: int = flag(400, "[1, 100000]")  # iterations of the long runs of the late-collapse claim
    long_eval_every: int = flag(20, "[1, 100000]")  # iterations between evaluations of a long run
    workers: int = flag(2, "[1, 64]")  # worker processes, one run each at a time
    tuning: str = flag("toy/tuned.json", tuning_range)  # the tuning file the settings come from
    out: str = flag("runs/study", train.folder_range)  # folder for results.json
    write: str = flag("toy/RESULTS.md", tune.file_range)  # the results file; its figures go to figures/ beside it

    RELATIONS = (("second_seeds", lambda c: not set(c.seeds.split(",")) & set(c.second_seeds.split(",")),
                  "seeds disjoint from --seeds={seeds}"),)

    def __post_init__(self):
        if isinstance(self.algos, str):
            train.Config(algos=self.algos, tuned=False)  # first, for a message that names the entry at fault
        cli.check_flags(self)


def hardware():
    """One line on the machine the numbers were measured on."""
    try:
        model = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        model = platform.processor() or platform.machine()
    return f"{model}, {os.cpu_count()} cores, {platform.system()}, Python {platform.python_version()}, torch " \
           f"{torch.__version__}, one thread a run"


def plan(scfg, reward):
    """One reward's parts -> {part: (config, algorithms, settings, seeds)}."""
    first, second = [[int(s) for s in v.split(",")] for v in (scfg.seeds, scfg.second_seeds)]
    cfg = train.Config(reward=reward, iters=scfg.iters)
    algos = train.parse_algos(scfg.algos)
    parts = {"runs": (cfg, algos, first + second)}
    long = {n: a for n, a in algos.items() if n in LONG_ALGOS}
    if long:
        parts["long"] = (replace(cfg, iters=scfg.long_iters, eval_every=scfg.long_eval_every), long, first + second)
    if scfg.axis_study:
        parts["axes"] = (cfg, train.parse_algos(AXIS_ALGOS), first)
    return {part: (c, a, train.tuned_settings(c, a, tune.ROOT / scfg.tuning), s) for part, (c, a, s) in parts.items()}


def run(scfg, base):
    """Every part of every reward, in one pool (longest runs first) -> {reward: {part: results}}."""
    plans = {reward: plan(scfg, reward) for reward in scfg.rewards.split(",")}
    jobs = {(reward, part, *key): job for reward, parts in plans.items() for part, (cfg, algos, settings, seeds)
            in parts.items() for key, job in train.jobs_for(cfg, algos, settings, seeds).items()}
    order = sorted(jobs, key=lambda k: -jobs[k][1].iters)
    logs = dict(zip(order, train.run_jobs(base, [jobs[k] for k in order], scfg.workers)))
    out = {}
    for reward, parts in plans.items():
        out[reward] = {}
        for part, (cfg, algos, settings, seeds) in parts.items():
            results = train.collect(cfg, settings, base, {(n, s): logs[reward, part, n, s] for n in algos for s in seeds})
            for key in ("samples", "prompts", "group_sizes", "eval_prompts"):
                del results[key]  # only the main job's figures draw them
            out[reward][part] = results
    return out


def judge(scfg, base, parts):
    """One reward's claims on each seed set, combined, and the sampler comparison they read."""
    cfg = train.Config(reward=parts["runs"]["config"]["reward"])
    levels = sorted({s["noise_level"] for n, s in parts["runs"]["settings"].items() if n.startswith("stepwise_ddim")})
    samplers = claims.sampler_rewards(base, cfg, levels)
    per_set = [claims.evaluate(claims.Runs(parts["runs"], [int(s) for s in seeds.split(",")], parts.get("long"),
                                           samplers)) for seeds in (scfg.seeds, scfg.second_seeds)]
    return {"samplers": samplers, "claims": claims.combine(per_set)}


def setup(argv):
    """Flags -> a checked StudyConfig whose tuning covers every part, or exit with one line."""
    try:
        scfg = cli.read_flags(StudyConfig, argv)
        for reward in scfg.rewards.split(","):
            plan(scfg, reward)
        return scfg
    except FlagError as e:
        sys.exit(f"error: {e}")


def main(argv):
    scfg = setup(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    base = flow.pretrain()
    study = run(scfg, base)
    for reward, parts in study.items():
        parts.update(judge(scfg, base, parts))
        parts["table"] = train.summarise(parts["runs"], next(iter(parts["runs"]["curves"])))
    tuning = json.loads((tune.ROOT / scfg.tuning).read_text())
    results = {"command": " ".join(["python toy/study.py", *argv]), "hardware": f"{hardware()}, {scfg.workers} "
               "worker processes", "config": asdict(scfg), "tuning": {k: tuning[k] for k in ("command", "chosen", "table")},
               "rewards": study, "seconds": time.perf_counter() - started}
    out, target = Path(scfg.out), tune.ROOT / scfg.write
    try:
        out.mkdir(parents=True, exist_ok=True)
        cli.atomic_write(out / "results.json", json.dumps(results).encode())
        saved = json.loads((out / "results.json").read_text())  # the results file is drawn from the file alone
        (target.parent / "figures").mkdir(parents=True, exist_ok=True)
        for reward, parts in saved["rewards"].items():
            for part in ("runs", "long"):
                if part in parts:
                    plots.reward_curves(parts[part], target.parent / "figures" / f"study_{reward}_{part}.png")
        cli.atomic_write(target, report(saved).encode())
    except OSError as e:
        sys.exit(f"error: cannot write the results ({e})")
    print(report(saved))
    print(f"wrote {out / 'results.json'} and {target} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main(sys.argv[1:])
