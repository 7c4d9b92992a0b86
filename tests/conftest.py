import os
import sys
from pathlib import Path

import pytest
import torch

# Tests import minflow, toy and sd35 from the repository root, as the scripts do.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

# pytest.ini runs the tests in worker processes (pytest-xdist), one per core. Each worker then
# computes on one thread, and so do the programs the tests start: threads beyond the cores
# only wait for each other.
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)
    os.environ["OMP_NUM_THREADS"] = "1"


def pytest_xdist_auto_num_workers(config):
    """`-n auto`: one worker per core, at most 4 (each holds torch, diffusers and a tiny pipeline;
    beyond 4 the longest tests, not the workers, set the time)."""
    return max(1, min(4, len(os.sched_getaffinity(0))))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tests on one thread, as the toy's main job does: its tensors are too
    small for threads to pay, and on a loaded machine extra threads only wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
