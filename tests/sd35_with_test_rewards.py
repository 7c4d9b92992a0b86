"""sd35/train.py with two extra rewards and an injected fault, for the multi-rank tests: a torchrun
worker is a fresh process, so the tests cannot monkeypatch it and run this script instead.

    by_prompt        a score that depends on the prompt alone, so a 1-rank and a 2-rank run
                     see the same rewards, hence the same tracker and the same prompt draws
    fails_on_rank_1  the mean pixel, except that rank 1's reward server is gone

With RECORD_DIR set, every rank writes its pid there when it starts and a file when it has
destroyed its process group, so a test can tell that every rank ended cleanly. With
OOM_ON_RANK_1_AT=N, rank 1's training passes of iteration N run out of memory (as CUDA would say).
With RANK_1_REWARD_URL, rank 1 asks that reward server instead of --reward_url's.
"""
import dataclasses
import os
import sys
from pathlib import Path

import torch
import torch.distributed as dist

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
from sd35 import rewards, train  # noqa: E402

RANK = os.environ.get("RANK", "0")
RECORD_DIR = os.environ.get("RECORD_DIR")
OOM_AT = int(os.environ.get("OOM_ON_RANK_1_AT", 0))


def by_prompt(images, prompts, metadata):
    return torch.tensor([sum(map(ord, p)) % 11 / 10 for p in prompts])


def fails_on_rank_1(images, prompts, metadata):
    if RANK == "1":
        raise ConnectionError("rank 1 lost its reward server")
    return images.mean((1, 2, 3))


def out_of_memory(*args):
    raise torch.OutOfMemoryError("CUDA out of memory. Tried to allocate 2.00 GiB (injected on rank 1)")


def optimise_with_oom_on_rank_1(run, it, *args):
    train.train_pass = out_of_memory if RANK == "1" and it + 1 == OOM_AT else train_pass
    return optimise(run, it, *args)


def destroy_and_record(*args, **kwargs):
    destroy_process_group(*args, **kwargs)
    (Path(RECORD_DIR) / f"destroyed-{RANK}").write_text("")


rewards.REWARDS.update(by_prompt=lambda options: by_prompt, fails_on_rank_1=lambda options: fails_on_rank_1)
if RECORD_DIR:
    (Path(RECORD_DIR) / f"pid-{RANK}").write_text(str(os.getpid()))
    destroy_process_group, dist.destroy_process_group = dist.destroy_process_group, destroy_and_record
if RANK == "1" and os.environ.get("RANK_1_REWARD_URL"):
    remote = rewards.REWARDS["remote"]
    rewards.REWARDS["remote"] = lambda options: remote(dataclasses.replace(options,
                                                                           remote_url=os.environ["RANK_1_REWARD_URL"]))
if OOM_AT:
    optimise, train_pass, train.optimise = train.optimise, train.train_pass, optimise_with_oom_on_rank_1

if __name__ == "__main__":
    train.main(sys.argv[1:])
