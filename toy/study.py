"""The study: every preset and ablation on both toy rewards, the claims, the axes -> toy/RESULTS.md.

    python toy/study.py                                  # reads toy/tuned.json (python toy/tune.py)
    python toy/study.py --rewards=hit --axis_study=false --workers=1

Runs each --algos entry at its tuned setting on two disjoint sets of held-out seeds and judges
the papers' claims on each (toy/claims.py); runs the long runs the late-collapse claim needs and
the axis study (one axis moved from Flow-GRPO or SuperFlow, first seed set); writes
OUT/results.json, then the results file (--write) and its figures from that file alone.
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

STUDY_ALGOS = ("flow_grpo,stepwise,stepwise:gain_norm=per_step,stepwise_ddim,stepwise_ddim:ddim_noise=posterior,"
               "superflow,superflow:group_min=1,superflow_no_dynamic_sampling,superflow_no_step_credit,flow_spo")
AXIS_ALGOS = ("flow_grpo:prompt_sampling=variance,flow_grpo:group_sizing=bins,flow_grpo:baseline=tracker,"
              "flow_grpo:step_credit=noise,superflow:baseline=group")
LONG_ALGOS = ("superflow", claims.NO_SAMPLING)  # the late-collapse claim's pair
tuning_range = cli.text_range("the path of a file written by python toy/tune.py",
                              lambda v: isinstance(v, str) and v.strip() != "" and (tune.ROOT / v).is_file())


@dataclass(frozen=True)
class StudyConfig:
    algos: str = flag(STUDY_ALGOS, train.algos_range)  # every preset and ablation; each is judged by the claims
    axis_study: bool = flag(True, (False, True))  # also run the axis study (--axes), on the first seed set
    axes: str = flag(AXIS_ALGOS, train.algos_range)  # the axis study: one axis moved per entry
    rewards: str = flag("bump,hit", tune.values_of(train.Config, "reward", str))  # the toy rewards, each a study
    seeds: str = flag("3,4,5,6,7", train.seeds_range)  # the first set of held-out seeds
    second_seeds: str = flag("8,9,10,11,12", train.seeds_range)  # a disjoint second set, to tell stable verdicts
    iters: int = flag(100, "[1, 100000]")  # RL iterations per run: the main job's budget
    long_iters: int = flag(400, "[1, 100000]")  # iterations of the long runs of the late-collapse claim
    long_eval_every: int = flag(20, "[1, 100000]")  # iterations between evaluations of a long run
    workers: int = flag(train.WORKERS, "[1, 64]")  # worker processes, one run each at a time
    tuning: str = flag("toy/tuned.json", tuning_range)  # the tuning file the settings come from
    out: str = flag("runs/study", train.folder_range)  # folder for results.json
    write: str = flag("toy/RESULTS.md", tune.file_range)  # the results file; its figures go to figures/ beside it

    RELATIONS = (("second_seeds", lambda c: not set(c.seeds.split(",")) & set(c.second_seeds.split(",")),
                  "seeds disjoint from --seeds={seeds}"),
                 ("axes", lambda c: {e.split(":")[0] for e in c.axes.split(",")} <= set(c.algos.split(",")),
                  "entries whose preset (before the colon) is in --algos={algos}"))

    def __post_init__(self):
        for name in ("algos", "axes"):  # first, for a message that names the entry and the axis at fault
            try:
                if isinstance(getattr(self, name), str):
                    train.Config(algos=getattr(self, name), tuned=False)
            except FlagError as e:
                raise FlagError(f"--axes={self.axes}: {e}" if name == "axes" else str(e)) from None
        cli.check_flags(self)


def hardware():
    """One line on the machine the numbers were measured on."""
    try:
        cpu = next(line.split(":", 1)[1].strip() for line in open("/proc/cpuinfo") if line.startswith("model name"))
    except (OSError, StopIteration):
        cpu = platform.processor() or platform.machine()
    return f"{cpu}, {os.cpu_count()} cores, Python {platform.python_version()}, torch {torch.__version__}"


def plan(scfg, reward):
    """One reward's parts -> {part: (config, algorithms, settings, seeds)}."""
    seeds = [int(s) for s in f"{scfg.seeds},{scfg.second_seeds}".split(",")]
    cfg, algos = train.Config(reward=reward, iters=scfg.iters), train.parse_algos(scfg.algos)
    parts = {"runs": (cfg, algos, seeds)}
    if set(LONG_ALGOS) & set(algos):
        long = replace(cfg, iters=scfg.long_iters, eval_every=scfg.long_eval_every)
        parts["long"] = (long, {n: a for n, a in algos.items() if n in LONG_ALGOS}, seeds)
    if scfg.axis_study:
        parts["axes"] = (cfg, train.parse_algos(scfg.axes), seeds[:len(scfg.seeds.split(","))])
    return {part: (c, a, train.tuned_settings(c, a, tune.ROOT / scfg.tuning), s) for part, (c, a, s) in parts.items()}


def run(scfg, base):
    """Every part of every reward in one pool, longest runs first -> {reward: {part: results}}."""
    plans = {reward: plan(scfg, reward) for reward in scfg.rewards.split(",")}
    jobs = {(reward, part, *key): job for reward, parts in plans.items() for part, (cfg, algos, settings, seeds)
            in parts.items() for key, job in train.jobs_for(cfg, algos, settings, seeds).items()}
    order = sorted(jobs, key=lambda k: -jobs[k][1].iters)
    logs = dict(zip(order, train.run_jobs(base, [jobs[k] for k in order], scfg.workers)))
    study = {}
    for reward, parts in plans.items():
        for part, (cfg, algos, settings, seeds) in parts.items():
            mine = {(n, s): logs[reward, part, n, s] for n in algos for s in seeds}
            results = train.collect(cfg, settings, base, mine)
            for key in ("samples", "prompts", "group_sizes", "eval_prompts"):
                del results[key]  # only the main job's figures draw them
            study.setdefault(reward, {})[part] = results
        runs, levels = study[reward]["runs"], {s["noise_level"] for n, s in plans[reward]["runs"][2].items()
                                               if n.startswith("stepwise_ddim")}
        samplers = claims.sampler_rewards(base, plans[reward]["runs"][0], sorted(levels))
        per_set = [claims.evaluate(claims.Runs(runs, [int(s) for s in seeds.split(",")], study[reward].get("long"),
                                               samplers)) for seeds in (scfg.seeds, scfg.second_seeds)]
        study[reward].update(samplers=samplers, claims=claims.combine(per_set))
    return study


def cell(row):
    """A claim's cell: the verdict, then each seed set's value (and SE for a difference)."""
    def one(r):
        return r["verdict"] if r["value"] is None else f"{100 * r['value']:.1f} %" if r["spread"] is None else \
            f"{r['value']:+.3g} (SE {r['spread']:.2g})"
    values = "; ".join(one(r) for r in row["sets"])
    return f"**{row['verdict']}**" + ("" if all(r["value"] is None for r in row["sets"]) else f": {values}")


def axis_effects(parts):
    """Each axis-study entry's final reward minus its parent preset's, on the seeds it ran."""
    seeds = {int(s) for s in next(iter(parts["axes"]["curves"].values()))}
    axes, runs = claims.Runs(parts["axes"], seeds), claims.Runs(parts["runs"], seeds)
    return {n: axes.mean(n) - runs.mean(n.split(":")[0]) for n in axes.curves}


def differing(study):
    """Claims whose verdicts differ between the rewards, each with the axis whose single-axis
    effect changes most between them (the axis study's explanation)."""
    rewards = list(study)
    if len(rewards) < 2 or not all("axes" in study[r] for r in rewards):
        return ["- (needs both rewards and the axis study)"]
    effects, lines = {r: axis_effects(study[r]) for r in rewards}, []
    for i, row in enumerate(study[rewards[0]]["claims"]):
        verdicts = {r: study[r]["claims"][i]["verdict"] for r in rewards}
        if len(set(verdicts.values())) > 1:
            axis = max(effects[rewards[0]], key=lambda n: abs(effects[rewards[0]][n] - effects[rewards[1]][n]))
            lines.append(f"- {row['paper']}, \"{row['claim']}\": "
                         + ", ".join(f"{v} on {r}" for r, v in verdicts.items())
                         + f". The single-axis effect that changes most between the rewards: `{axis}` ("
                         + ", ".join(f"{effects[r][axis]:+.3f} on {r}" for r in rewards) + ").")
    return lines or ["- none."]


def part_table(results):
    """A part's results table (text), its first entry the baseline of the half-way mark."""
    baseline = next(iter(results["curves"]))
    return ["```text", *train.table_lines(train.summarise(results, baseline), baseline), "```"]


def report(saved):
    """The results file, from the saved results.json alone."""
    stamp = f"_Command: `{saved['command']}`; {saved['hardware']}; {saved['seconds']:.0f} s wall-clock in all._"
    cfg, study, tuning = saved["config"], saved["rewards"], saved["tuning"]
    out = ["# The toy's results", "", "Written by `python toy/study.py` from its `results.json`. Rewards: `bump` "
           "(continuous, OCR- or preference-like) and `hit` (0/1, GenEval-like); both lie in [0, 1], the range "
           "SuperFlow's tracker is given.", "", "## The papers' claims", "", stamp, "", claims.__doc__.split("\n\n")[1]
           .replace("\n", " ").strip() + f" Seed sets {cfg['seeds']} and {cfg['second_seeds']}; each cell: the "
           "verdict, then each set's value.", "", "| paper | claim | " + " | ".join(study) + " |",
           "|---|---|" + "---|" * len(study)]
    for i, row in enumerate(next(iter(study.values()))["claims"]):
        cells = " | ".join(cell(p["claims"][i]) for p in study.values())
        out.append(f"| {row['paper']} | {row['claim']} | {cells} |")
    out += ["", "Where the verdicts differ between the rewards:", "", *differing(study)]
    for reward, parts in study.items():
        out += ["", f"## Reward `{reward}`", "", "### Every preset and ablation", "", stamp, "",
                *part_table(parts["runs"]), "",
                f"![reward curves, {reward}](figures/study_{reward}_runs.png)", "", "### Each claim measured", ""]
        for row in parts["claims"]:
            out += [f"- **{row['verdict']}**, {row['paper']}: {row['claim']} ({row['metric']})"]
            out += [f"  - {r['measured']}" + (f" ({r['note']})" if r["note"] else "") for r in row["sets"]]
        if "long" in parts:
            out += ["", f"### Long runs ({cfg['long_iters']} iterations)", "", stamp, "", *part_table(parts["long"])]
        if "axes" in parts:
            out += ["", "### The axis study (one axis moved from the preset before the colon; final reward minus the "
                    "preset's on the same seeds)", "", stamp, "", *part_table(parts["axes"]), ""]
            out += [f"- `{n}`: {e:+.3f}" for n, e in axis_effects(parts).items()]
        out += ["", "### Tuning (mean final reward over the tuning seeds; bold: chosen)", "",
                f"_Command: `{tuning['command']}`; {saved['machine']}, one thread a run, {tuning['workers']} worker "
                f"processes; {tuning['seconds']:.0f} s wall-clock._", "",
                tune.markdown(tuning["table"][reward], tuning["chosen"][reward])]
    return "\n".join(out) + "\n"


def setup(argv):
    """Flags -> a checked StudyConfig whose tuning covers every part, or exit with one line."""
    try:
        scfg = cli.read_flags(StudyConfig, argv)
        for reward in scfg.rewards.split(","):
            plan(scfg, reward)
        tuning_stamp(scfg)
        return scfg
    except FlagError as e:
        sys.exit(f"error: {e}")


def tuning_stamp(scfg):
    """What the results file says of the tuning run (its choices, grids, command and time)."""
    tuning = json.loads((tune.ROOT / scfg.tuning).read_text())
    try:
        return {"workers": tuning["tune_config"]["workers"], **{k: tuning[k] for k in ("command", "chosen", "table",
                                                                                       "seconds")}}
    except (KeyError, TypeError) as e:
        raise FlagError(f"--tuning={scfg.tuning}: no {e} in the file; write it with python toy/tune.py") from None


def main(argv):
    scfg = setup(argv)
    torch.set_num_threads(1)
    started = time.perf_counter()
    study = run(scfg, flow.pretrain())
    machine = hardware()
    results = {"command": " ".join(["python toy/study.py", *argv]), "config": asdict(scfg), "rewards": study,
               "machine": machine, "hardware": f"{machine}, one thread a run, {scfg.workers} worker processes",
               "tuning": tuning_stamp(scfg), "seconds": time.perf_counter() - started}
    out, target = Path(scfg.out), tune.ROOT / scfg.write
    try:
        out.mkdir(parents=True, exist_ok=True)
        cli.atomic_write(out / "results.json", json.dumps(results).encode())
        saved = json.loads((out / "results.json").read_text())  # the results file is drawn from the file alone
        (target.parent / "figures").mkdir(parents=True, exist_ok=True)
        for reward, parts in saved["rewards"].items():
            for part in {"runs", "long"} & set(parts):
                plots.reward_curves(parts[part], target.parent / "figures" / f"study_{reward}_{part}.png")
        cli.atomic_write(target, report(saved).encode())
    except OSError as e:
        sys.exit(f"error: cannot write the results ({e})")
    print(f"wrote {out / 'results.json'} and {target} ({results['seconds']:.0f} s)")


if __name__ == "__main__":
    main(sys.argv[1:])
