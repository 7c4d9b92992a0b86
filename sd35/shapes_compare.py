"""Flow-GRPO, Stepwise-Flow-GRPO and SuperFlow side by side on the shapes task: every algorithm runs
`python sd35/train.py --model=shapes` with the model's defaults and the same budget of trajectories,
on each seed; then one results file with the table, the curves (held-out reward against trajectories
and against seconds) and the before/after grids.

    python sd35/shapes_compare.py                       # -> runs/shapes_compare/RESULTS.md and its figures
    python sd35/shapes_compare.py --iters=20 --seeds=1  # a quick look
"""
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import numpy as np
from PIL import Image

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import minflow  # noqa: E402
from cli import flag, text_range  # noqa: E402
from sd35.curves import read_log  # noqa: E402
from sd35.shapes import TRAIN_DEFAULTS  # noqa: E402
from toy.plots import reward_curves  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ALGOS = text_range(f"presets from {', '.join(minflow.PRESETS)}, separated by commas",
                   lambda v: all(a in minflow.PRESETS for a in v.split(",")))


@dataclass
class Settings:
    algos: str = flag("flow_grpo,stepwise,superflow", ALGOS)  # the presets compared
    seeds: int = flag(3, "[1, 100]")  # runs per algorithm, seeds 0, 1, ...
    iters: int = flag(TRAIN_DEFAULTS["iters"], "[1, 100000]")  # RL iterations of every run (one trajectory budget)
    eval_every: int = flag(TRAIN_DEFAULTS["eval_every"], "[1, 100000]")  # iterations between held-out evaluations
    workers: int = flag(2, "[1, 64]")  # runs at a time, each on one CPU thread
    out: str = flag("runs/shapes_compare", text_range("a folder"))  # one folder per run, RESULTS.md and figures


def train(s, algo, seed):
    """One run of sd35/train.py on one thread (skipped if its log is complete) -> its log entries."""
    folder = Path(s.out) / f"{algo}_seed{seed}"
    if not (folder / "log.jsonl").exists() or read_log(folder / "log.jsonl")[-1].get("iteration") != s.iters:
        done = subprocess.run([sys.executable, str(ROOT / "sd35" / "train.py"), "--model=shapes", f"--algo={algo}",
                               f"--seed={seed}", f"--iters={s.iters}", f"--eval_every={s.eval_every}",
                               f"--save_every={s.iters}", f"--out={folder}"],
                              cwd=ROOT, capture_output=True, text=True, env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode:
            raise RuntimeError(f"{algo} seed {seed} failed: {done.stderr.strip()[-500:]}")
    return read_log(folder / "log.jsonl")


def points(log, budget):
    """[evaluations, (trajectories, training seconds, held-out reward)] of one run's log."""
    rows, seconds = [], 0.0
    for entry in log:
        seconds += sum(entry.get(k, 0.0) for k in ("seconds_sampling", "seconds_reward", "seconds_training"))
        if "eval_reward" in entry:
            rows.append((entry["iteration"] * budget, seconds, entry["eval_reward"]))
    return np.array(rows)


def grids(s, algos):
    """grids.png: seed 0's held-out grid of the base model, then each algorithm's after its last iteration."""
    paths = [Path(s.out) / f"{algos[0]}_seed0" / "eval" / "iter_000000.png"]
    paths += [Path(s.out) / f"{algo}_seed0" / "eval" / f"iter_{s.iters:06d}.png" for algo in algos]
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    gap = np.full((images[0].shape[0], 8, 3), 255, dtype=np.uint8)
    Image.fromarray(np.concatenate([part for image in images for part in (gap, image)][1:], 1)).save(
        Path(s.out) / "grids.png")


def main(argv):
    try:
        s = cli.read_flags(Settings, argv)
    except ValueError as error:
        sys.exit(f"error: {error}")
    algos, budget = s.algos.split(","), TRAIN_DEFAULTS["group_size"] * TRAIN_DEFAULTS["prompts_per_iter"]
    Path(s.out).mkdir(parents=True, exist_ok=True)
    jobs = [(algo, seed) for seed in range(s.seeds) for algo in algos]
    with ThreadPoolExecutor(s.workers) as pool:
        try:
            runs = {job: points(log, budget) for job, log in zip(jobs, pool.map(lambda job: train(s, *job), jobs))}
        except RuntimeError as error:
            sys.exit(f"error: {error}")
    reward_curves({key: {algo: {seed: runs[algo, seed][:, [x, 2]] for seed in range(s.seeds)} for algo in algos}
                   for key, x in (("curves", 0), ("clock", 1))}, Path(s.out) / "curves.png",
                  ylabel="held-out reward (ODE, test prompts)")
    grids(s, algos)
    rows = ["| algorithm | base | final | gain | best during the run | training seconds |", "|---|---|---|---|---|---|"]
    for algo in algos:
        seeds = np.stack([runs[algo, seed] for seed in range(s.seeds)])  # [seeds, evaluations, 3]
        base, final, best = seeds[:, 0, 2], seeds[:, -1, 2], seeds[:, :, 2].max(1)
        gain = final - base
        rows.append(f"| {algo} | {base.mean():.3f} | {final.mean():.3f} ± {final.std():.3f} | {gain.mean():+.3f} ± "
                    f"{gain.std():.3f} | {best.mean():.3f} ± {best.std():.3f} | {seeds[:, -1, 1].mean():.0f} |")
    text = (f"# Shapes: the three algorithms at one budget\n\nMade by `python sd35/shapes_compare.py {' '.join(argv)}`"
            f": {s.iters} iterations of {budget} trajectories, seeds 0-{s.seeds - 1}, every run at --model=shapes' "
            "defaults (sd35/shapes.py: TRAIN_DEFAULTS), one CPU thread each. Held-out reward: the mean over the test "
            "prompts of ODE samples from fixed noise; mean ± std over the seeds.\n\n" + "\n".join(rows) +
            "\n\n![held-out reward against trajectories and seconds](curves.png)\n\nSeed 0's held-out grid, "
            f"base model then {', '.join(algos)} after the last iteration:\n\n![grids](grids.png)\n")
    cli.atomic_write(Path(s.out) / "RESULTS.md", text.encode())
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
