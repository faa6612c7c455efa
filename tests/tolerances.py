"""The one tolerance table: kernel vs reference (and vs float64 torch composites), per dtype of the tensors
compared.

Outputs in bf16/fp16 are rounded once from fp32 math, so a kernel and the reference may differ by one or two
ulps of the output dtype; fp32 differs only by the order of fp32 operations and reductions. Each row has the
elementwise tolerances (``atol``, ``rtol``: torch.testing.assert_close) and ``rel_norm``, the bound on
‖actual − expected‖ / ‖expected‖ that every gradient check also meets: a relative norm does not pass a gradient
that is zero, or scaled far below ``atol``, where an elementwise check with an absolute floor would."""
import torch

TABLE = {
    torch.float64: dict(atol=1e-10, rtol=1e-8, rel_norm=1e-9),
    torch.float32: dict(atol=2e-5, rtol=2e-5, rel_norm=1e-5),
    torch.float16: dict(atol=2e-3, rtol=2e-3, rel_norm=2e-3),
    torch.bfloat16: dict(atol=1.6e-2, rtol=1.6e-2, rel_norm=1.6e-2),
}
# the elementwise columns, as keyword arguments of torch.testing.assert_close
TOLERANCES = {dtype: dict(atol=row["atol"], rtol=row["rtol"]) for dtype, row in TABLE.items()}

# The same-seed noise of two backends differs only by the last bits of fp32 log/sqrt/sin/cos.
NOISE_ATOL = 1e-5


def assert_close(actual, expected, dtype=None, msg=None, *, noise_scale=0.0):
    """Compare ``actual`` with ``expected`` at the tolerance of ``dtype`` (default: ``actual``'s dtype), with
    ``noise_scale``·NOISE_ATOL more absolute tolerance where a term ε·scale of two backends' same-seed noise (or
    of the reference's noise) enters, |scale| ≤ noise_scale."""
    tol = dict(TOLERANCES[dtype or actual.dtype])
    tol["atol"] += noise_scale * NOISE_ATOL
    torch.testing.assert_close(actual, expected.to(actual.dtype), **tol, msg=msg)


def relative_norm_error(actual, expected) -> float:
    """‖actual − expected‖₂ / ‖expected‖₂ in float64 (inf where expected is zero and actual is not, 0 where both
    are zero)."""
    a, b = actual.detach().double(), expected.detach().to(actual.device).double()
    err, ref = (a - b).norm().item(), b.norm().item()
    if ref == 0:
        return 0.0 if err == 0 else float("inf")
    return err / ref


def assert_close_rel_norm(actual, expected, dtype=None, msg=None, *, allow_zero=False):
    """‖actual − expected‖ / ‖expected‖ within the ``rel_norm`` tolerance of ``dtype`` (default: ``actual``'s
    dtype), shapes equal. ``expected`` must not be all zeros unless ``allow_zero`` (a zero expected gradient says
    nothing of the backward: use random upstream gradients)."""
    assert actual.shape == expected.shape, f"{msg + ': ' if msg else ''}shape {actual.shape} != {expected.shape}"
    if not allow_zero:
        assert expected.detach().abs().sum() > 0, f"{msg + ': ' if msg else ''}the expected tensor is all zeros"
    tol = TABLE[dtype or actual.dtype]["rel_norm"]
    error = relative_norm_error(actual, expected)
    assert error <= tol, f"{msg + ': ' if msg else ''}relative norm error {error:.3g} > {tol:g}"


def assert_grads_close(actual, expected, dtype=None, msg=None, *, allow_zero=False, noise_scale=0.0):
    """A gradient against its expected value: elementwise (:func:`assert_close`) and by relative norm
    (:func:`assert_close_rel_norm`) at the tolerances of ``dtype``."""
    assert_close(actual, expected, dtype, msg, noise_scale=noise_scale)
    assert_close_rel_norm(actual, expected, dtype, msg, allow_zero=allow_zero)


def assert_all_grads_close(actual, expected, dtype=None, msg=None):
    """The gradients of a whole model (sequences of tensors, None where a leaf gets none): each elementwise, and
    all of them together by relative norm. Together, because a model has gradients that are zero in exact
    arithmetic (a bias a normalisation cancels) and O(ulp) noise in fp32: their own relative norm means nothing."""
    actual, expected = list(actual), list(expected)
    assert len(actual) == len(expected)
    for i, (a, e) in enumerate(zip(actual, expected)):
        assert (a is None) == (e is None), f"{msg + ': ' if msg else ''}gradient {i}: one is None"
        if a is not None:
            assert_close(a, e, dtype, f"{msg + ': ' if msg else ''}gradient {i}")
    pairs = [(a.reshape(-1), e.reshape(-1)) for a, e in zip(actual, expected) if a is not None]
    assert_close_rel_norm(torch.cat([a.to(e.dtype) for a, e in pairs]), torch.cat([e for _, e in pairs]),
                          dtype or pairs[0][0].dtype, msg)

