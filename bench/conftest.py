"""pytest-benchmark regression set (``pytest bench/ --benchmark-json out.json``): small CPU cases, one test per
(case, implementation). Not part of ``make test`` (which collects only tests/)."""
import pytest
import torch

from genfast.bench import runner


def pytest_configure(config):
    torch.set_num_threads(2)


@pytest.fixture(scope="session")
def cpu():
    return torch.device("cpu")


def pytest_generate_tests(metafunc):
    """``impl``: eager and each genfast backend usable on the CPU (discovered at run time)."""
    if "impl" in metafunc.fixturenames:
        backends, _ = runner.genfast_backends(torch.device("cpu"))
        metafunc.parametrize("impl", [runner.EAGER] + [runner.genfast_impl(b) for b in backends])
