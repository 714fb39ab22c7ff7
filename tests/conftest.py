"Fixtures shared by the test files; plain helpers are in `helpers.py`."
import pytest
import torch
from fastai.torch_core import set_seed

from fastai_cds.digits import digits_dls

# Tiny models on a 2-core machine: one intra-op thread is no slower than two, and leaves no threads spinning.
# Child processes get the same through OMP_NUM_THREADS=1 (`helpers.run_children`).
torch.set_num_threads(1)
# The test files `from helpers import ...`: pytest's default import mode (prepend) puts this folder (which is not a
# package) on sys.path.


@pytest.fixture
def seeded():
    "`set_seed(0)` before the test: a module takes it for every test with `pytestmark = pytest.mark.usefixtures('seeded')`"
    set_seed(0)


@pytest.fixture(scope="module")
def dls():
    "digits at 16 px, batches of 16, with the default (random) augmentation"
    return digits_dls(device="cpu", size=16, label_fraction=0.3, bs=16)
