"""A run's log.jsonl: written a line at a time by sd35/train.py (RunLog), mirrored to tensorboard or
wandb with --report_to (Mirror), and drawn as curves.png at every evaluation; for a run folder copied
home from a cluster:

    python sd35/curves.py --log=runs/sd35/log.jsonl            # writes runs/sd35/curves.png
    python sd35/curves.py --log=copied/log.jsonl --png=here.png
"""
import io
import json
import os
import sys
from dataclasses import dataclass
from pathlib import Path

import matplotlib

matplotlib.use("Agg")
import matplotlib.pyplot as plt  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
import cli  # noqa: E402
from cli import flag  # noqa: E402

WANDB_ID_FILE = "wandb-run-id"  # in --out: the id of the wandb run that the run's resumes continue
# (title, [(log key, label)]) of the panels drawn as plain lines, after the reward panels.
PANELS = [
    ("KL", [("kl", "KL to the reference"), ("approx_kl", "approx KL(old || new)")]),
    ("clip fraction", [("clipfrac", "clipfrac")]),
    ("importance ratio (mean)", [("ratio", "all optimiser steps"), ("ratio_first", "the first step (must be 1)")]),
    ("zero-variance group share", [("zero_std_ratio", "groups with zero reward spread")]),
    ("tracker uncertainty of the prompt draw", [("drawn_uncertainty", "drawn prompts"), ("pool_uncertainty", "whole pool")]),
    ("gradient norm (before clipping)", [("grad_norm", "largest finite gradient norm")]),
    ("final images (reward-hacking alarms)", [(f"image_{k}", k) for k in ("brightness", "black_share", "white_share",
                                                                        "edge_density")]),
]


def read_log(path):
    """The log's entries, skipping a last line torn by a kill (a line is complete with its newline)."""
    entries = []
    for line in Path(path).read_text(errors="replace").split("\n")[:-1]:
        try:
            entries.append(json.loads(line))
        except json.JSONDecodeError:
            continue
    return entries


def _series(entries, key):
    points = [(e["iteration"], e[key]) for e in entries if "iteration" in e and isinstance(e.get(key), (int, float))]
    return [p[0] for p in points], [p[1] for p in points]


def _line(ax, entries, key, label, **style):
    xs, ys = _series(entries, key)
    if xs:
        ax.plot(xs, ys, label=label, **style)


def draw(entries, path):
    """Draw the curves of a run's log entries into the PNG `path` (atomically)."""
    train, evals = [e for e in entries if "reward_mean" in e], [e for e in entries if "eval_reward" in e]
    fig, axes = plt.subplots(3, 4, figsize=(18, 11), constrained_layout=True)
    reward, terms, evaluation, sizes, *rest = axes.flat
    xs, mean = _series(train, "reward_mean")
    _, std = _series(train, "reward_std")
    reward.plot(xs, mean, label="mean")
    reward.fill_between(xs, [m - s for m, s in zip(mean, std)], [m + s for m, s in zip(mean, std)], alpha=0.25,
                        label="+- std")
    reward.set_title("training reward")
    for name in sorted({k for e in train for k in e if k.startswith("reward_")} - {"reward_mean", "reward_std"}):
        _line(terms, train, name, name.removeprefix("reward_"))
    terms.set_title("reward terms (training means)")
    for key in sorted({k for e in evals for k in e if k.startswith("eval_reward")}):
        _line(evaluation, evals, key, key.removeprefix("eval_reward_") if key != "eval_reward" else "total", marker="o")
    evaluation.set_title("evaluation reward (ODE samples, test prompts)")
    sized = [e for e in train if e.get("group_sizes")]  # flat under fixed sizes; a band under binned ones
    if sized:
        its = [e["iteration"] for e in sized]
        sizes.fill_between(its, [min(e["group_sizes"]) for e in sized], [max(e["group_sizes"]) for e in sized],
                           alpha=0.25, label="min..max")
        sizes.plot(its, [sum(e["group_sizes"]) / len(e["group_sizes"]) for e in sized], label="mean")
    sizes.set_title("group sizes")
    for ax, (title, lines) in zip(rest, PANELS):
        for key, label in lines:
            _line(ax, train, key, label)
        ax.set_title(title)
    rest[0].set_yscale("symlog", linthresh=1e-6)
    rest[3].set_ylim(-0.02, 1.02)
    rest[-2].set_ylim(-0.02, 1.02)
    rest[-1].axis("off")
    for ax in axes.flat[:-1]:
        ax.set_xlabel("iteration")
        if ax.get_legend_handles_labels()[0]:
            ax.legend(fontsize=8)
        else:
            ax.text(0.5, 0.5, "not in this log", ha="center", va="center", transform=ax.transAxes, color="gray")
    buffer = io.BytesIO()
    fig.savefig(buffer, format="png", dpi=90)
    plt.close(fig)
    cli.atomic_write(path, buffer.getvalue())


class Mirror:
    """The log mirrored to a tracker, log.jsonl staying the source of truth: `log(step, entry, images)`
    sends an entry's numbers and named uint8 [H, W, 3] images; with report_to "none" it does nothing.
    tensorboard writes to OUT/tensorboard; wandb reads its own environment (WANDB_MODE=offline runs
    without a network, WANDB_PROJECT names the project) and writes to OUT. A run that keeps its log up
    to iteration `kept` (as RunLog) continues the tracker's run: tensorboard hides the steps after it
    that an earlier attempt logged, wandb resumes the run whose id OUT/WANDB_ID_FILE holds."""

    def __init__(self, report_to, out, config, kept=None):
        self.writer = self.run = None
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(out / "tensorboard"), purge_step=None if kept is None else kept + 1)
        elif report_to == "wandb":
            import wandb
            self.wandb, id_file = wandb, out / WANDB_ID_FILE
            run_id = id_file.read_text() if kept != -1 and id_file.exists() else None
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "minflow-sd35"), dir=str(out), config=config,
                                  id=run_id, resume="allow")
            cli.atomic_write(id_file, self.run.id.encode())

    def log(self, step, entry=None, images=None):
        numbers = {k: float(v) for k, v in (entry or {}).items() if isinstance(v, (int, float)) and k != "iteration"}
        images = images or {}
        if self.writer:
            for key, value in numbers.items():
                self.writer.add_scalar(key, value, step)
            for name, pixels in images.items():
                self.writer.add_image(name, pixels, step, dataformats="HWC")
            self.writer.flush()
        elif self.run:
            self.run.log({**numbers, **{name: self.wandb.Image(pixels) for name, pixels in images.items()}}, step=step)

    def close(self, failure=None):
        """End the tracker's run, recording the one-line `failure` that ended it, if one did."""
        if self.writer:
            if failure:
                self.writer.add_text("error", failure)
            self.writer.close()
        elif self.run:
            if failure:
                self.run.summary["error"] = failure
            self.run.finish(exit_code=1 if failure else 0)


class RunLog:
    """Rank 0's log.jsonl, fsynced a line at a time and mirrored; `log(iteration, entry, redraw)` also
    redraws curves.png. Opened with `kept` (None: appended to as it is), it keeps the lines up to
    that iteration (-1: none, a fresh run); a line torn by a kill is dropped."""

    def __init__(self, path, master, mirror, kept=None):
        self.path, self.master, self.mirror, self.step = path, master, mirror, max(kept or 0, 0)
        if master and path.exists() and kept is not None:
            entries = [e for e in read_log(path) if e.get("iteration", 0) <= kept]
            cli.atomic_write(path, "".join(json.dumps(e) + "\n" for e in entries).encode())

    def __call__(self, iteration, entry, redraw=False):
        if not self.master:
            return
        entry = entry if iteration is None else {"iteration": iteration, **entry}
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.step = self.step if iteration is None else iteration
        self.mirror.log(self.step, entry)
        if redraw:
            draw(read_log(self.path), self.path.with_name("curves.png"))


@dataclass
class Settings:
    log: str = flag("runs/sd35/log.jsonl", lambda v: None if v and Path(v).is_file() else "an existing log.jsonl file")  # the run's log
    png: str = flag("", "text")  # where to write the figure; "" = curves.png next to the log


def main(argv):
    try:
        settings = cli.read_flags(Settings, argv)
    except ValueError as error:
        sys.exit(f"error: {error}")
    png = Path(settings.png or Path(settings.log).with_name("curves.png"))
    draw(read_log(settings.log), png)
    print(f"wrote {png}")


if __name__ == "__main__":
    main(sys.argv[1:])
