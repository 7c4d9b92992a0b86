"""Tune every algorithm alike, per reward: learning rate x noise level on the tuning seeds.

    python toy/tune.py                                   # the presets, both rewards, seeds 0-2
    python toy/tune.py --algos=flow_grpo,superflow --rewards=hit --lrs=1e-3,3e-3 --write=/tmp/tuned.json

Every algorithm starts from one grid (--lrs x --noise_levels: every sampler's noise level is
tuned), the same budget and the tuning seeds (never the reported ones). Where the best setting
sits on the lowest or highest noise level tried, the next level of --wider on that side is tried
at the best lr, until the best is inside or --wider is used up. Keeps, per reward and algorithm,
the highest mean final eval reward over the seeds and writes the grids and choices to
toy/tuned.json. An entry that fixes its noise level is tuned over lr only; an entry the file
lacks takes its method's setting (toy/train.py's tuned_source).
"""
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import minflow  # noqa: E402
from cli import FlagError, flag  # noqa: E402
from toy import flow, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
TUNED_ALGOS = "flow_grpo,stepwise,stepwise_ddim,stepwise_ddim:ddim_noise=posterior,superflow,flow_spo"


def values_of(settings, name, kind=float):
    """Declared range of a comma-separated list of distinct values, each a valid `name` of the
    settings class `settings` (its own declared range)."""
    accepts = {f.name: f.metadata["accepts"] for f in fields(settings)}[name]

    def parse(value):  # a ValueError (FlagError is one) unless each value converts, is in range and is new
        items = [kind(v.strip()) for v in value.split(",")]
        for item in items:
            cli.check_flags(replace(settings(), **{name: item}))
        if len(set(items)) < len(items):
            raise ValueError("a value repeats")
    return cli.text_range(f"comma-separated distinct values, each {cli.describe(accepts, kind)}",
                          lambda v: isinstance(v, str) and cli.parses(parse)(v))


def _writable_file(value):
    path = ROOT / value  # an absolute path stays as it is
    existing = next(p for p in path.parents if p.exists())
    return not path.is_dir() and existing.is_dir() and os.access(existing, os.W_OK)


file_range = cli.text_range("a file path in a writable folder, not empty and not a folder", lambda v: isinstance(
    v, str) and v.strip() != "" and "\0" not in v and _writable_file(v))


@dataclass(frozen=True)
class TuneConfig:
    algos: str = flag(TUNED_ALGOS, train.algos_range)  # the entries to tune, as the main job's --algos
    rewards: str = flag("bump,hit", values_of(train.Config, "reward", str))  # the toy rewards to tune for, each apart
    seeds: str = flag("0,1,2", train.seeds_range)  # tuning seeds; the main job and the study report others
    lrs: str = flag("3e-4,1e-3,3e-3", values_of(train.Config, "lr"))  # learning-rate grid
    noise_levels: str = flag("0.5,0.7,1.0", values_of(minflow.Algorithm, "noise_level"))  # noise-level grid
    wider: str = flag("0.2,0.3,1.4,2.0", values_of(minflow.Algorithm, "noise_level"))  # levels tried past an edge that a best sits on
    iters: int = flag(train.Config.iters, "[1, 100000]")  # RL iterations per run: the main job's budget
    workers: int = flag(train.WORKERS, "[1, 64]")  # worker processes, one run each at a time
    write: str = flag("toy/tuned.json", file_range)  # where the choices go (relative to the repository root)

    def __post_init__(self):
        if isinstance(self.algos, str):  # first, for a message that names the entry and the axis at fault
            train.Config(algos=self.algos, tuned=False)  # and every entry trains some step at its own level
        cli.check_flags(self)
        cfg, free = train.Config(tuned=False), [e for e in self.algos.split(",") if "noise_level=" not in e]
        for name in ("noise_levels", "wider"):
            try:  # every level must train some step of every entry tuned over it
                for a in [float(v) for v in getattr(self, name).split(",")] if free else []:
                    replace(cfg, algos=",".join(f"{e}:noise_level={a:g}" for e in free))  # checked on construction
            except FlagError as e:
                raise FlagError(f"--{name}={getattr(self, name)}: {e}") from None


def widen(entry, rows, tcfg):
    """The next noise level to try when the best setting sits on the lowest or highest level
    tried, from --wider on that side; None when the best is inside or none is left."""
    if "noise_level=" in entry:
        return None
    tried, best = sorted({r["noise_level"] for r in rows}), max(rows, key=lambda r: r["mean"])["noise_level"]
    below = [a for a in map(float, tcfg.wider.split(",")) if a < tried[0]]
    above = [a for a in map(float, tcfg.wider.split(",")) if a > tried[-1]]
    return max(below) if best == tried[0] and below else min(above) if best == tried[-1] and above else None


def tune(tcfg, base):
    """-> ({reward: {entry: rows}}, {reward: {entry: the best row's lr, level and finals}})."""
    algos, seeds = train.parse_algos(tcfg.algos), [int(s) for s in tcfg.seeds.split(",")]
    table = {reward: {entry: [] for entry in algos} for reward in tcfg.rewards.split(",")}
    levels = sorted(map(float, tcfg.noise_levels.split(",")))
    points = [(reward, e, float(lr), a) for reward in table for e, algo in algos.items() for lr in tcfg.lrs.split(",")
              for a in ([algo.noise_level] if "noise_level=" in e else levels)]
    while points:  # the grid, then one widening round after another
        jobs = [(replace(algos[e], noise_level=a), train.Config(tuned=False, reward=reward, iters=tcfg.iters, lr=lr,
                                                                 eval_every=tcfg.iters), seed)
                for reward, e, lr, a in points for seed in seeds]
        logs = iter(train.run_jobs(base, jobs, tcfg.workers, "tuning iterations"))
        for reward, e, lr, a in points:
            finals = torch.tensor([next(logs)["curves"][-1][1] for _ in seeds])
            table[reward][e].append({"lr": lr, "noise_level": a, "finals": finals.tolist(),
                                     "mean": finals.mean().item(),
                                     "std": finals.std().item() if len(finals) > 1 else 0.0})  # sample std
        points = [(reward, e, max(rows, key=lambda r: r["mean"])["lr"], a) for reward, entries in table.items()
                  for e, rows in entries.items() if (a := widen(e, rows, tcfg)) is not None]  # at the best lr
    chosen = {reward: {} for reward in table}
    for reward, entries in table.items():
        for entry, rows in entries.items():
            rows.sort(key=lambda r: (r["lr"], r["noise_level"]))
            best = max(rows, key=lambda r: r["mean"])  # the first of equals, in grid order
            chosen[reward][entry] = {"lr": best["lr"], "noise_level": best["noise_level"], "final_mean": best["mean"],
                                     "final_std": best["std"]}
    return table, chosen


def markdown(table, chosen):
    """One reward's tuning grid as a Markdown table (rows: algorithms; columns: settings)."""
    columns = sorted({(r["lr"], r["noise_level"]) for rows in table.values() for r in rows})
    lines = ["| algorithm | " + " | ".join(f"lr {lr:g}, a {a:g}" for lr, a in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for entry, rows in table.items():
        cells = {(r["lr"], r["noise_level"]): r["mean"] for r in rows}
        best = (chosen[entry]["lr"], chosen[entry]["noise_level"])
        lines.append(f"| {entry} | " + " | ".join("" if c not in cells else f"**{cells[c]:.3f}**" if c == best
                                                  else f"{cells[c]:.3f}" for c in columns) + " |")
    return "\n".join(lines)


def setup(argv):
    """Flags -> a checked TuneConfig, or exit with one line before any work."""
    try:
        return cli.read_flags(TuneConfig, argv)
    except FlagError as e:
        sys.exit(f"error: {e}")


def main(argv):
    tcfg = setup(argv)
    target = ROOT / tcfg.write  # an absolute --write stays as it is
    torch.set_num_threads(1)
    started = time.perf_counter()
    base = flow.pretrain()
    table, chosen = tune(tcfg, base)
    for reward in table:
        print(f"\nreward {reward}\n" + markdown(table[reward], chosen[reward]))
    result = {"command": " ".join(["python toy/tune.py", *argv]), "tune_config": asdict(tcfg),
              "budget": {"iters": tcfg.iters, "trajectories": train.Config.trajectories,
                         "prompts_per_iter": train.Config.prompts_per_iter},
              "criterion": "highest mean final eval reward over the tuning seeds (first of equals in grid order)",
              "chosen": chosen, "table": table, "seconds": time.perf_counter() - started}
    try:
        target.parent.mkdir(parents=True, exist_ok=True)
        cli.atomic_write(target, (json.dumps(result, indent=1) + "\n").encode())
    except OSError as e:
        sys.exit(f"error: --write={tcfg.write}: cannot write ({e.strerror})")
    print(f"wrote {target} ({result['seconds']:.0f} s)")


if __name__ == "__main__":
    main(sys.argv[1:])
