"""The backends of the op test matrix: every test that takes the ``backend`` fixture (tests/conftest.py) runs once
per name of :data:`BACKENDS`; one that cannot run on this machine is skipped with the reason of the backend table
(``genfast._backend.why_not``)."""
import pytest

from genfast._backend import why_not

BACKENDS = ("reference", "triton", "cpp")  # "triton": the interpreter on CPU tensors (TRITON_INTERPRET=1)
KERNEL_BACKENDS = ("triton", "cpp")  # compared with the reference as well as with float64 torch composites


def skip_reason(name: str, device="cpu", op=None) -> str | None:
    """Why ``name`` cannot run ``op`` (None: any op) on ``device`` here, as a skip reason; None when it can."""
    reason = why_not(name, device, op=op)
    return None if reason is None else f"backend {name!r} cannot run here: {reason}"


def skip_unless_usable(name: str, device="cpu", op=None) -> None:
    reason = skip_reason(name, device, op)
    if reason is not None:
        pytest.skip(reason)

