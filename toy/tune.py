"""Tune every algorithm alike: learning rate x noise level on the tuning seeds; writes toy/tuned.json.

    python toy/tune.py                                   # the main job's algorithms, seeds 0-2
    python toy/tune.py --algos=flow_grpo,superflow --lrs=1e-3,3e-3 --write=/tmp/tuned.json

Every algorithm gets the same grid (lr in {3e-4, 1e-3, 3e-3} x noise level a in {0.5, 0.7, 1.0},
the paper's 0.7 for Flow-GRPO's SDE included: every sampler's a is tuned, none is held fixed),
the same budget as the main job (its defaults: 100 iterations x 128 trajectories) and the same
seeds (0-2, never the main job's 3-7). It keeps, for each, the setting with the highest mean
final eval reward over the tuning seeds, prints the whole grid and writes it with the choices
to the JSON file the main job reads (toy/tuned.json by default; --tuned=false ignores it).
An entry that fixes its own noise level (`stepwise:noise_level=0.5`) is tuned over lr only.
"""
import json
import os
import sys
import time
from dataclasses import asdict, dataclass, fields, replace
from pathlib import Path

import torch
from tqdm import tqdm

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import minflow  # noqa: E402
from cli import FlagError, flag  # noqa: E402
from toy import flow, train  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]


def values_of(settings, name):
    """Declared range of a comma-separated list whose items must each be a valid `name` of the
    settings class `settings` (its own declared range), distinct."""
    accepts = {f.name: f.metadata["accepts"] for f in fields(settings)}[name]

    def check(value):
        if value is None:
            return f"comma-separated distinct values, each {cli.describe(accepts, float)}"
        try:
            items = [float(v) for v in value.split(",")] if isinstance(value, str) else None
            cli.check_flags(replace(settings(), **{name: items[0]}))  # raises FlagError if out of range
            for item in items[1:]:
                cli.check_flags(replace(settings(), **{name: item}))
        except (ValueError, TypeError, FlagError):
            return check(None)
        return None if len(set(items)) == len(items) else check(None)
    return check


def file_range(value):
    """Declared range of --write: a file path (relative to the repository root) in a folder
    that exists or can be made under a writable one; nothing is written by the check."""
    if value is None:
        return "a file path in a writable folder, not empty and not a folder"
    if not (isinstance(value, str) and value.strip() and "\0" not in value):
        return file_range(None)
    path = ROOT / value
    existing = next(p for p in path.parents if p.exists())
    return None if not path.is_dir() and existing.is_dir() and os.access(existing, os.W_OK) else file_range(None)


@dataclass(frozen=True)
class TuneConfig:
    algos: str = flag(train.DEFAULT_ALGOS, train.algos_range)  # the entries to tune, as the main job's --algos
    seeds: str = flag("0,1,2", train.seeds_range)  # tuning seeds; the main job reports others
    lrs: str = flag("3e-4,1e-3,3e-3", values_of(train.Config, "lr"))  # learning-rate grid
    noise_levels: str = flag("0.5,0.7,1.0", values_of(minflow.Algorithm, "noise_level"))  # noise-level grid
    iters: int = flag(train.Config.iters, "[1, 100000]")  # RL iterations per run: the main job's budget
    write: str = flag("toy/tuned.json", file_range)  # where the choices go (relative to the repository root)

    def __post_init__(self):
        if isinstance(self.algos, str):
            train.parse_algos(self.algos)  # first, for a message that names the entry and the axis at fault
        cli.check_flags(self)


def grid(entry, algo, tcfg):
    """The (lr, noise level) settings an entry is tried at."""
    levels = [algo.noise_level] if "noise_level=" in entry else [float(a) for a in tcfg.noise_levels.split(",")]
    return [(float(lr), a) for lr in tcfg.lrs.split(",") for a in levels]


def tune(tcfg, base, progress=None):
    """Every entry x grid point x tuning seed -> {entry: [row per grid point]}, best first chosen."""
    cfg = train.Config(tuned=False, iters=tcfg.iters)
    evaluation = train.Evaluation(cfg)
    seeds = [int(s) for s in tcfg.seeds.split(",")]
    table, chosen = {}, {}
    for entry, algo in train.parse_algos(tcfg.algos).items():
        rows = []
        for lr, a in grid(entry, algo, tcfg):
            finals = [train.train(base, replace(algo, noise_level=a), replace(cfg, lr=lr), seed, progress,
                                  evaluation)["curve"][-1][1] for seed in seeds]
            t = torch.tensor(finals)
            rows.append({"lr": lr, "noise_level": a, "finals": finals, "mean": t.mean().item(),
                         "std": t.std().item() if len(finals) > 1 else 0.0})  # sample std over seeds
        table[entry] = rows
        best = max(rows, key=lambda r: r["mean"])  # the first of equals, in grid order
        chosen[entry] = {"lr": best["lr"], "noise_level": best["noise_level"], "final_mean": best["mean"],
                         "final_std": best["std"]}
    return table, chosen


def print_grid(table, chosen):
    for entry, rows in table.items():
        print(f"\n{entry}")
        for r in rows:
            mark = " <- chosen" if (r["lr"], r["noise_level"]) == (chosen[entry]["lr"], chosen[entry]["noise_level"]) else ""
            print(f"  lr {r['lr']:<7g} a {r['noise_level']:<4g} final {r['mean']:.3f} ± {r['std']:.3f}{mark}")


def markdown(table, chosen):
    """The tuning grid as a Markdown table (rows: algorithms; columns: settings), for the README."""
    columns = sorted({(r["lr"], r["noise_level"]) for rows in table.values() for r in rows})
    lines = ["| algorithm | " + " | ".join(f"lr {lr:g}, a {a:g}" for lr, a in columns) + " |",
             "|---|" + "---|" * len(columns)]
    for entry, rows in table.items():
        cells = {(r["lr"], r["noise_level"]): r["mean"] for r in rows}
        best = (chosen[entry]["lr"], chosen[entry]["noise_level"])
        lines.append(f"| {entry} | " + " | ".join(
            "" if c not in cells else (f"**{cells[c]:.3f}**" if c == best else f"{cells[c]:.3f}") for c in columns) + " |")
    return "\n".join(lines)


def setup(argv):
    """Flags -> a checked TuneConfig, or exit with one line before any work."""
    try:
        return TuneConfig(**cli.parse_flags(TuneConfig, argv))
    except FlagError as e:
        sys.exit(f"error: {e}")


def main(argv):
    tcfg = setup(argv)
    target = ROOT / tcfg.write  # an absolute --write stays as it is
    torch.set_num_threads(1)
    started = time.perf_counter()
    base = flow.pretrain()
    algos = train.parse_algos(tcfg.algos)
    total = sum(len(grid(e, a, tcfg)) for e, a in algos.items()) * len(tcfg.seeds.split(",")) * tcfg.iters
    with tqdm(total=total, desc="tuning iterations", mininterval=2) as progress:
        table, chosen = tune(tcfg, base, progress)
    print_grid(table, chosen)
    print("\n" + markdown(table, chosen))
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
