"""The one tolerance table: kernel vs reference, per dtype of the tensors compared.

Outputs in bf16/fp16 are rounded once from fp32 math, so a kernel and the reference may differ by one or two
ulps of the output dtype; fp32 differs only by the order of fp32 operations and reductions."""
import torch

TOLERANCES = {
    torch.float64: dict(atol=1e-10, rtol=1e-8),
    torch.float32: dict(atol=2e-5, rtol=2e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2),
}

# The same-seed noise of two backends differs only by the last bits of fp32 log/sqrt/sin/cos.
NOISE_ATOL = 1e-5


def assert_close(actual, expected, dtype=None, msg=None):
    """Compare ``actual`` with ``expected`` at the tolerance of ``dtype`` (default: ``actual``'s dtype)."""
    tol = TOLERANCES[dtype or actual.dtype]
    torch.testing.assert_close(actual, expected.to(actual.dtype), **tol, msg=msg)
