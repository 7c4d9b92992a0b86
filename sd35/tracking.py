"""Mirror a run's log to an experiment tracker (--report_to=tensorboard or wandb). log.jsonl stays
the source of truth; rank 0 sends each entry's numbers at its iteration, and each evaluation grid
as an image. tensorboard writes event files to OUT/tensorboard; wandb reads its own environment
(WANDB_MODE=offline runs without a network, WANDB_PROJECT names the project) and writes to OUT.
"""
import importlib.util
import json
import os

import cli
from sd35 import curves

PACKAGES = {"none": None, "tensorboard": "tensorboard", "wandb": "wandb"}


def missing_package(report_to):
    """The package --report_to needs that is not installed, or None; cheap, checked before any model loads."""
    package = PACKAGES[report_to]
    return package if package and importlib.util.find_spec(package) is None else None


class Mirror:
    """`log(entry, step)` and `image(name, uint8 [H, W, 3] array, step)` into the tracker; with
    report_to "none" both do nothing."""

    def __init__(self, report_to, out, config):
        self.writer, self.run = None, None
        if report_to == "tensorboard":
            from torch.utils.tensorboard import SummaryWriter
            self.writer = SummaryWriter(log_dir=str(out / "tensorboard"))
        elif report_to == "wandb":
            import wandb
            self.wandb = wandb
            self.run = wandb.init(project=os.environ.get("WANDB_PROJECT", "minflow-sd35"), dir=str(out), config=config)

    def log(self, entry, step):
        numbers = {k: float(v) for k, v in entry.items() if isinstance(v, (int, float)) and k != "iteration"}
        if self.writer:
            for key, value in numbers.items():
                self.writer.add_scalar(key, value, step)
            self.writer.flush()
        elif self.run:
            self.run.log(numbers, step=step)

    def image(self, name, pixels, step):
        if self.writer:
            self.writer.add_image(name, pixels, step, dataformats="HWC")
            self.writer.flush()
        elif self.run:
            self.run.log({name: self.wandb.Image(pixels)}, step=step)

    def close(self):
        if self.writer:
            self.writer.close()
        elif self.run:
            self.run.finish()


class RunLog:
    """Rank 0's log.jsonl, fsynced a line at a time and mirrored; `log(iteration, entry, draw)` also
    redraws curves.png. Opened at `start` (None: appended to as it is), it keeps the lines up to
    that iteration; a line torn by a kill is dropped."""

    def __init__(self, path, master, mirror, start=None):
        self.path, self.master, self.mirror, self.step = path, master, mirror, start or 0
        if master and path.exists() and start is not None:
            kept = [e for e in curves.read_log(path) if e.get("iteration", 0) <= start]
            cli.atomic_write(path, "".join(json.dumps(e) + "\n" for e in kept).encode())

    def __call__(self, iteration, entry, draw=False):
        if not self.master:
            return
        entry = entry if iteration is None else {"iteration": iteration, **entry}
        with open(self.path, "a") as f:
            f.write(json.dumps(entry) + "\n")
            f.flush()
            os.fsync(f.fileno())
        self.step = self.step if iteration is None else iteration
        self.mirror.log(entry, self.step)
        if draw:
            curves.draw(curves.read_log(self.path), self.path.with_name("curves.png"))
