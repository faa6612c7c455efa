"""Test set-up: the Triton kernels run in the interpreter on the CPU, so TRITON_INTERPRET must be set before
genfast (and so Triton's ``@jit``) is imported."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

import genfast  # noqa: E402

CUDA = torch.cuda.is_available()

# `make test` runs two xdist workers on a 2-core machine: one intra-op thread each keeps them from oversubscribing
# the cores (two threads per worker spin-wait and ran the model tests ~5x slower).
if os.environ.get("PYTEST_XDIST_WORKER"):
    torch.set_num_threads(1)


def pytest_configure(config):
    config.addinivalue_line("markers", "gpu: needs a CUDA GPU (skipped without one)")


def pytest_collection_modifyitems(config, items):
    if CUDA:
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(params=["reference", "triton"])
def backend(request):
    """Runs the test once per backend; "triton" is the interpreter on the CPU, compiled kernels on a GPU."""
    with genfast.use_backend(request.param):
        yield request.param


@pytest.fixture
def device():
    return torch.device("cuda" if CUDA else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
