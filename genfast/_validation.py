"""Argument checks shared by every public op: each error names the argument and what was expected."""
from __future__ import annotations

import torch

FLOAT_DTYPES = (torch.float32, torch.bfloat16, torch.float16, torch.float64)
_FLOAT_DTYPES = frozenset(FLOAT_DTYPES)  # a set lookup: these checks run on every call
INTEGER_DTYPES = frozenset((torch.int64, torch.int32, torch.int16, torch.int8, torch.uint8))  # timesteps


def check_float_tensor(x, name: str, *, min_dim: int = 0, dim: int | None = None) -> None:
    """``x`` is a floating-point tensor of fp32/bf16/fp16/fp64 with at least ``min_dim`` (or exactly ``dim``) dims."""
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"{name} must be a torch.Tensor, got {type(x).__name__}")
    if x.dtype not in _FLOAT_DTYPES:
        raise TypeError(f"{name} must have a floating dtype (float32, bfloat16, float16 or float64), got {x.dtype}")
    if dim is not None and x.dim() != dim:
        raise ValueError(f"{name} must have {dim} dimensions, got shape {tuple(x.shape)}")
    if min_dim and x.dim() < min_dim:
        raise ValueError(f"{name} must have at least {min_dim} dimensions, got shape {tuple(x.shape)}")


def check_like(x, name: str, ref: torch.Tensor, ref_name: str, *, shape=None, same_dtype: bool = False) -> None:
    """``x`` is a float tensor on ``ref``'s device with shape ``shape`` (default: ``ref``'s shape)."""
    check_float_tensor(x, name)
    expected = ref.shape if shape is None else shape
    if x.shape != expected:
        raise ValueError(f"{name} must have shape {tuple(expected)} (from {ref_name}), got {tuple(x.shape)}")
    if x.device != ref.device:
        raise ValueError(f"{name} is on {x.device} but {ref_name} is on {ref.device}: they must be on one device")
    if same_dtype and x.dtype != ref.dtype:
        raise TypeError(f"{name} must have {ref_name}'s dtype {ref.dtype}, got {x.dtype}")


def check_noise(noise, ref: torch.Tensor, ref_name: str) -> None:
    """``noise`` is None or a float tensor like ``ref`` that does not require grad: ε is a constant of the op (no
    gradient flows to it), so a noise that asks for one is refused rather than silently left without."""
    if noise is None:
        return
    check_like(noise, "noise", ref, ref_name)
    if noise.requires_grad:
        raise ValueError("noise must not require grad: the op treats ε as a constant and gives it no gradient "
                         "(pass noise.detach())")


def check_generator(generator, device: torch.device) -> None:
    if generator is not None and not isinstance(generator, torch.Generator):
        raise TypeError(f"generator must be a torch.Generator or None, got {type(generator).__name__}")


def batch_major(x: torch.Tensor) -> torch.Tensor:
    """``x`` itself when it is dense with the batch dimension outermost in memory (contiguous or channels_last),
    else a contiguous copy. The kernels and the noise stream index such tensors by memory position."""
    if x.is_contiguous():
        return x
    if x.dim() == 4 and x.is_contiguous(memory_format=torch.channels_last):
        return x
    if x.dim() == 5 and x.is_contiguous(memory_format=torch.channels_last_3d):
        return x
    return x.contiguous()


def assert_all(condition: torch.Tensor, message: str) -> None:
    """ValueError(message) unless every entry of the bool tensor ``condition`` holds, without reading it back:
    ``torch._assert_async`` fails at once on the CPU and, on a GPU, as a device-side assert that the next
    synchronizing call reports (under torch.compile its RuntimeError)."""
    try:
        torch._assert_async(condition.all(), message)
    except RuntimeError:  # the CPU's immediate failure
        raise ValueError(message) from None


def check_timesteps_range(t, num_steps: int, name: str = "t", *, allow_negative: bool = False) -> None:
    """Every entry of ``t`` (an int, or an integer tensor) lies in [0, num_steps) (below num_steps with
    ``allow_negative``): an int on the host, a tensor with :func:`assert_all` (no read-back, no sync)."""
    bounds = f"< {num_steps}" if allow_negative else f"in [0, {num_steps})"
    if not isinstance(t, torch.Tensor):
        if t >= num_steps or (t < 0 and not allow_negative):
            raise ValueError(f"{name} must be {bounds}, got {t}")
        return
    inside = t < num_steps if allow_negative else t.clamp(0, num_steps - 1) == t
    assert_all(inside, f"{name} must be {bounds} for every sample")


def check_timesteps_not_after(t_prev, t) -> None:
    """t_prev ≤ t for every sample: a stochastic DDIM step goes back in time (its σ is NaN for t_prev > t). Ints
    on the host; where either is a tensor, with :func:`assert_all`."""
    message = ("t_prev must be <= t for every sample when eta > 0 (DDIM inversion, t_prev > t, is deterministic "
               "only: eta = 0)")
    if isinstance(t_prev, torch.Tensor) or isinstance(t, torch.Tensor):
        assert_all(t_prev <= t, message)
    elif t_prev > t:
        raise ValueError(message)


def check_timesteps_before(t_prev, t) -> None:
    """t_prev < t for every sample: a DDPM step goes back in time (its variance is negative otherwise). Ints on the
    host; where either is a tensor, with :func:`assert_all`."""
    message = "t_prev must be < t for every sample (a DDPM step goes from t back to t_prev)"
    if isinstance(t_prev, torch.Tensor) or isinstance(t, torch.Tensor):
        assert_all(t_prev < t, message)
    elif t_prev >= t:
        raise ValueError(f"{message}, got t={t}, t_prev={t_prev}")


def check_choice(value, name: str, choices: tuple) -> None:
    """``value`` is one of ``choices`` (strings): ValueError naming ``name`` and the choices otherwise."""
    if not isinstance(value, str) or value not in choices:
        raise ValueError(f"{name} must be one of {', '.join(map(repr, choices))}, got {value!r}")


def match_layout(x: torch.Tensor, ref: torch.Tensor, dtype: torch.dtype | None = None) -> torch.Tensor:
    """``x`` in ``ref``'s memory layout (and ``dtype``, default ``x``'s): a copy only when strides or dtype differ."""
    dtype = x.dtype if dtype is None else dtype
    if x.stride() == ref.stride() and x.dtype == dtype:
        return x
    return torch.empty_like(ref, dtype=dtype).copy_(x)
