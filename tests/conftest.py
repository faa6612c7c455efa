"""Test set-up: without a GPU the Triton kernels run in the interpreter on the CPU, so TRITON_INTERPRET=1 is set
(unless TRITON_INTERPRET is set already) before genfast, and so Triton's ``@jit``, is imported; where CUDA is
present it is left alone, so that the kernels compile (``make gpu-check`` sets TRITON_INTERPRET=0 explicitly). The
``backend`` fixture is the one test matrix of the op tests: every backend of ``backends.BACKENDS`` usable here."""
import os

import pytest
import torch

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")

import genfast  # noqa: E402
from backends import BACKENDS, KERNEL_BACKENDS, skip_unless_usable  # noqa: E402

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


def _use(name):
    skip_unless_usable(name)  # "cpp" without a loadable extension: skipped with why_not's reason
    with genfast.use_backend(name):
        yield name


@pytest.fixture(params=BACKENDS)
def backend(request):
    """Runs the test once per backend, selected with ``genfast.use_backend``: "reference", "triton" (the
    interpreter on the CPU, compiled kernels on a GPU) and "cpp"; a backend that cannot run here is skipped with
    the reason of ``genfast._backend.why_not``."""
    yield from _use(request.param)


@pytest.fixture(params=KERNEL_BACKENDS)
def kernel_backend(request):
    """As ``backend``, for the kernel backends only ("triton", "cpp"): tests that compare them with the reference."""
    yield from _use(request.param)


@pytest.fixture
def device():
    return torch.device("cuda" if CUDA else "cpu")


@pytest.fixture(autouse=True)
def _seed():
    torch.manual_seed(0)
