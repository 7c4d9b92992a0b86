import sys
from pathlib import Path

import pytest
import torch

# Tests import minflow, toy and sd35 from the repository root, as the scripts do.
sys.path.insert(0, str(Path(__file__).resolve().parents[1]))


@pytest.fixture(scope="module")
def one_torch_thread():
    """Run a module's tests on one thread, as the toy's main job does: its tensors are too
    small for threads to pay, and on a loaded machine extra threads only wait for each other."""
    threads = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(threads)
