"""The ranks of a run, alone or under torchrun, and how they end together: each rank's share of a
batch, the collectives the trainer needs (gather, a summed gradient), and agreement points at
which every rank learns whether any failed or saw a stop signal, so that all stop at one point."""
import os
import traceback
from contextlib import contextmanager, suppress
from pathlib import Path

import torch
import torch.distributed as dist

from sd35 import models
from sd35.rewards import RewardError


class RunError(RuntimeError):
    """Something at run time that training cannot go on from; the message is one line."""


class Stop(Exception):
    """A stop signal seen on this rank: the work in progress is abandoned, then the ranks agree to stop."""


class Ended(Exception):
    """Every rank agreed to end the run: on a stop signal (`signal`), else on a failure (the one-line message)."""

    def __init__(self, message="", signal=0):
        super().__init__(message)
        self.signal = signal


MESSAGE_BYTES = 2000  # of a failing rank's one line, sent to every rank at an agreement


class Ranks:
    """The ranks under torchrun, or one. Every rank plans each iteration from the same seeded
    generator, samples its contiguous share and all-gathers the rewards, so advantages come from
    the whole batch and a group spanning ranks is normalised whole (per rank would bias the
    baseline); each rank then trains on its share. A stop signal only sets `stop_signal`; the
    ranks act on it together, at an agreement (see `together`)."""

    def __init__(self, device_flag, out):
        self.distributed = "RANK" in os.environ
        self.rank, self.world = int(os.environ.get("RANK", 0)), int(os.environ.get("WORLD_SIZE", 1))
        local_rank = int(os.environ["LOCAL_RANK"]) if self.distributed else None
        self.device = models.choose_device(device_flag, torch.cuda.device_count(), local_rank)
        self.master, self.out = self.rank == 0, Path(out)
        self.stop_signal = 0

    def start(self):
        if self.device.type == "cuda":
            torch.cuda.set_device(self.device)
        if self.distributed:
            dist.init_process_group("nccl" if self.device.type == "cuda" else "gloo")

    def check_stop(self):
        if self.stop_signal:
            raise Stop

    def share(self, total, rank=None):
        """A rank's contiguous slice of `total` items; shares differ by at most one item."""
        rank = self.rank if rank is None else rank
        per, extra = divmod(total, self.world)
        start = rank * per + min(rank, extra)
        return slice(start, start + per + (rank < extra))

    def gather(self, local, total=None):
        """Concatenate every rank's tensor in rank order (CPU in, CPU out): its share(total) rows, padded
        here to one size for the collective (without `total`, every rank holds as many)."""
        if not self.distributed:
            return local
        total = len(local) * self.world if total is None else total
        padded = torch.zeros((-(-total // self.world), *local.shape[1:]), dtype=local.dtype, device=self.device)
        padded[:len(local)] = local.to(self.device)
        parts = [torch.empty_like(padded) for _ in range(self.world)]
        dist.all_gather(parts, padded)
        shares = [self.share(total, rank) for rank in range(self.world)]
        return torch.cat([part[:share.stop - share.start] for part, share in zip(parts, shares)]).cpu()

    def sum_gradients(self, params):
        """Sum the ranks' gradients of `params` in one all-reduce of a flat buffer (a rank without rows adds 0)."""
        if self.distributed:
            flat = torch.cat([(p.grad if p.grad is not None else torch.zeros_like(p)).flatten() for p in params])
            dist.all_reduce(flat)
            for p, grad in zip(params, flat.split([p.numel() for p in params])):
                p.grad = grad.view_as(p)

    def agree(self, failure=None):
        """An agreement point, which every rank reaches: each tells the others whether it failed (the one
        line `failure`) or saw a stop signal; if any did, every rank raises the same Ended."""
        text = (failure or "").encode()[:MESSAGE_BYTES]
        mine = torch.zeros(1, 2 + MESSAGE_BYTES, dtype=torch.uint8)
        mine[0, :2 + len(text)] = torch.tensor([failure is not None, self.stop_signal, *text], dtype=torch.uint8)
        try:
            everyone = self.gather(mine)
        except Exception as error:  # a rank that died (gloo notices at once) or a broken device
            raise Ended(failure or f"rank {self.rank} cannot reach the other ranks: {' '.join(str(error).split())}")
        failed = everyone[:, 0].nonzero().flatten().tolist()
        if failed:
            message = bytes(everyone[failed[0], 2:].tolist()).rstrip(b"\0").decode(errors="ignore")
            raise Ended(message if len(failed) == self.world else f"rank {failed[0]}: {message}")
        if everyone[:, 1].any():
            raise Ended(signal=int(everyone[:, 1].max()))


@contextmanager
def together(ranks):
    """Run a block on every rank, then agree (Ranks.agree) on whether it failed or saw a stop anywhere.
    A rank that fails sends its line at its next agreement, which must be the others' next collective
    too: so every other collective directly follows an agreement, with nothing that can fail between
    them. Blocks nest; an Ended from an inner one passes through, already agreed."""
    failure = None
    try:
        yield
    except Ended:
        raise
    except Stop:
        pass  # ranks.stop_signal says so at the agreement
    except (RunError, RewardError, OSError) as error:  # messages of ours, or a write's (a full disk): they say all
        failure = " ".join(str(error).split())
    except Exception as error:  # unexpected: its type, and its traceback in a file that the line names
        path = ranks.out / f"error-rank{ranks.rank}.txt"
        with suppress(OSError):  # the line matters more than the file
            path.write_text("".join(traceback.format_exception(error)))
        failure = f"{type(error).__name__}: {' '.join(str(error).split())} (traceback: {path})"
    ranks.agree(failure)
