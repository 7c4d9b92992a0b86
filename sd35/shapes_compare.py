"""Flow-GRPO, Stepwise-Flow-GRPO and SuperFlow side by side on the shapes task: every algorithm runs
`python sd35/train.py --model=shapes --reward=shapes --prompts=shapes` with the model's defaults and
the same budget of trajectories, on each seed; then one results file with the table, the curves
(held-out reward against trajectories and against seconds) and the before/after grids.

    python sd35/shapes_compare.py                       # -> runs/shapes_compare/RESULTS.md and its figures
    python sd35/shapes_compare.py --iters=20 --seeds=1  # a quick look
"""
import io
import os
import subprocess
import sys
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402
import numpy as np  # noqa: E402
from PIL import Image  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
import minflow  # noqa: E402
from cli import flag, text_range  # noqa: E402
from sd35.curves import read_log  # noqa: E402
from sd35.shapes import TRAIN_DEFAULTS  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
ALGOS = text_range(f"presets from {', '.join(minflow.PRESETS)}, separated by commas",
                   lambda v: all(a in minflow.PRESETS for a in v.split(",")))


@dataclass
class Settings:
    algos: str = flag("flow_grpo,stepwise,superflow", ALGOS)  # the presets compared
    seeds: int = flag(3, "[1, 100]")  # runs per algorithm, seeds 0, 1, ...
    iters: int = flag(TRAIN_DEFAULTS["iters"], "[1, 100000]")  # RL iterations of every run (one trajectory budget)
    workers: int = flag(2, "[1, 64]")  # runs at a time, each on one CPU thread
    out: str = flag("runs/shapes_compare", text_range("a folder"))  # one folder per run, RESULTS.md and figures


def train(out, algo, seed, iters):
    """One run of sd35/train.py on one thread; its log, or a RuntimeError with the end of its output."""
    folder = out / f"{algo}_seed{seed}"
    command = [sys.executable, str(ROOT / "sd35" / "train.py"), "--model=shapes", "--reward=shapes",
               "--prompts=shapes", f"--algo={algo}", f"--seed={seed}", f"--iters={iters}", f"--out={folder}"]
    if not (folder / "log.jsonl").exists() or read_log(folder / "log.jsonl")[-1].get("iteration") != iters:
        resume = ["--resume"] if (folder / "checkpoints").is_dir() else []  # a comparison stopped half way
        done = subprocess.run(command + resume, cwd=ROOT, capture_output=True, text=True,
                              env={**os.environ, "OMP_NUM_THREADS": "1"})
        if done.returncode:
            raise RuntimeError(f"{algo} seed {seed} failed: {done.stderr.strip()[-500:]}")
    return read_log(folder / "log.jsonl")


def curves(log, budget):
    """(trajectories, training seconds, held-out reward) at each evaluation of a run's log."""
    points, seconds = [], 0.0
    for entry in log:
        seconds += sum(entry.get(k, 0.0) for k in ("seconds_sampling", "seconds_reward", "seconds_training"))
        if "eval_reward" in entry:
            points.append((entry["iteration"] * budget, seconds, entry["eval_reward"]))
    return np.array(points)


def figures(runs, out):
    """curves.png: held-out reward against trajectories and against seconds (seed mean, min..max band)."""
    fig, axes = plt.subplots(1, 2, figsize=(12, 4.5))
    for algo, points in runs.items():
        points = np.stack(points)  # [seeds, evaluations, (trajectories, seconds, reward)]
        for ax, x in zip(axes, (points[0, :, 0], points[:, :, 1].mean(0))):
            line, = ax.plot(x, points[:, :, 2].mean(0), label=algo)
            ax.fill_between(x, points[:, :, 2].min(0), points[:, :, 2].max(0), color=line.get_color(), alpha=0.15)
    axes[0].set(xlabel="trajectories sampled", ylabel="held-out reward (ODE, test prompts)")
    axes[1].set(xlabel="training seconds (sampling, scoring, update; mean over seeds)")
    axes[0].legend()
    buffer = io.BytesIO()
    fig.tight_layout()
    fig.savefig(buffer, format="png", dpi=100)
    plt.close(fig)
    cli.atomic_write(out / "curves.png", buffer.getvalue())


def grids(algos, iters, out):
    """grids.png: seed 0's evaluation grid of the base model, then each algorithm's after its last iteration."""
    paths = [out / f"{algos[0]}_seed0" / "eval" / "iter_000000.png"]
    paths += [out / f"{algo}_seed0" / "eval" / f"iter_{iters:06d}.png" for algo in algos]
    images = [np.asarray(Image.open(p).convert("RGB")) for p in paths]
    gap = np.full((images[0].shape[0], 8, 3), 255, dtype=np.uint8)
    row = np.concatenate([part for image in images for part in (image, gap)][:-1], 1)
    buffer = io.BytesIO()
    Image.fromarray(row).save(buffer, format="PNG")
    cli.atomic_write(out / "grids.png", buffer.getvalue())


def main(argv):
    try:
        s = cli.read_flags(Settings, argv)
    except ValueError as error:
        sys.exit(f"error: {error}")
    out, algos = Path(s.out), s.algos.split(",")
    out.mkdir(parents=True, exist_ok=True)
    jobs = [(algo, seed) for algo in algos for seed in range(s.seeds)]
    with ThreadPoolExecutor(s.workers) as pool:
        try:
            logs = dict(zip(jobs, pool.map(lambda job: train(out, *job, s.iters), jobs)))
        except RuntimeError as error:
            sys.exit(f"error: {error}")
    budget = TRAIN_DEFAULTS["group_size"] * TRAIN_DEFAULTS["prompts_per_iter"]
    runs = {algo: [curves(logs[algo, seed], budget) for seed in range(s.seeds)] for algo in algos}
    figures(runs, out)
    grids(algos, s.iters, out)
    rows = ["| algorithm | base | final | gain | seconds per run |", "|---|---|---|---|---|"]
    for algo, points in runs.items():
        base, final, seconds = (np.array([p[i, k] for p in points]) for i, k in ((0, 2), (-1, 2), (-1, 1)))
        rows.append(f"| {algo} | {base.mean():.3f} | {final.mean():.3f} ± {final.std():.3f} | "
                    f"{(final - base).mean():+.3f} ± {(final - base).std():.3f} | {seconds.mean():.0f} |")
    text = (f"# Shapes: the three algorithms at one budget\n\nMade by `python sd35/shapes_compare.py "
            f"{' '.join(argv)}`: {s.iters} iterations of {budget} trajectories, seeds 0-{s.seeds - 1}, every run "
            "at --model=shapes' defaults (sd35/shapes.py: TRAIN_DEFAULTS); held-out reward: the mean over the "
            "test prompts of ODE samples from fixed noise, mean ± std over the seeds.\n\n" + "\n".join(rows) +
            "\n\n![held-out reward against trajectories and seconds](curves.png)\n\nSeed 0's held-out grid, "
            f"base model then {', '.join(algos)} after the last iteration:\n\n![grids](grids.png)\n")
    cli.atomic_write(out / "RESULTS.md", text.encode())
    print(text)


if __name__ == "__main__":
    main(sys.argv[1:])
