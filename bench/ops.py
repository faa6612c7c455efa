"""The per-op cases: for each fused op, the eager baseline, the genfast call, the shapes (from real models), and the
minimal bytes a pass must move (the one place the byte formulas live; README restates them).

The eager baseline is the plain PyTorch composite of ``genfast.composite`` (the code a user writes: ``torch.randn``
noise, ``F.group_norm`` → ``F.silu``, the autograd penalty), called directly: the same functions the "torch"
backend runs, so there is one formula per op, not a copy here.

Byte formulas count each tensor the op must read or write once, at the input dtype's itemsize s (N = numel of the
main tensor, B = batch, C = channels): noise drawn in the kernel is not a tensor and is not counted, nor are the
(B,) timestep / coefficient gathers. Where an op calls a user model or critic (diffusion loss, gradient penalty),
that callable's own traffic is left out of the bytes but is in the time, so the bandwidth is a lower bound.
"""
from __future__ import annotations

import functools
import math
from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

import genfast
import genfast.ops.diffusion
import genfast.ops.gradient_penalty
import genfast.ops.group_norm_silu
import genfast.ops.reparameterize
from genfast.composite import diffusion, gradient_penalty, group_norm_silu, reparameterize

MODES = ("forward", "backward", "forward+backward")
FP32 = torch.float32
NUM_GROUPS = 32
NUM_STEPS = 1000
PENALTY_WEIGHT = 10.0
DDIM_STRIDE = 20


@dataclass(frozen=True)
class Case:
    """One benchmark row family: an op at one shape, variant, memory layout, dtype and mode."""

    op: str
    shape: tuple
    mode: str
    variant: str = "-"
    layout: str = "-"
    dtype: torch.dtype = FP32

    @property
    def label(self) -> str:
        parts = [self.op] + [p for p in (self.variant, self.layout) if p != "-"]
        return f"{'/'.join(parts)} {'x'.join(map(str, self.shape))} {self.mode}"


@dataclass(frozen=True)
class OpBench:
    """An op under test. ``inputs(case, device, grad)`` builds the tensors (``grad``: the ones in ``grad_names``
    require grad); ``eager`` (the composite) and ``genfast`` (the public op) map them to a tuple of outputs;
    ``forward_bytes`` and ``backward_bytes`` give the minimal traffic of one pass; ``module`` is the op's name in
    every layer (``genfast.ops.<module>.OP``: the key of ``genfast._backend.DEVICES``)."""

    name: str
    inputs: Callable[[Case, torch.device, bool], dict]
    eager: Callable[[dict], tuple]
    genfast: Callable[[dict], tuple]
    grad_names: tuple
    forward_bytes: Callable[[Case], int]
    backward_bytes: Callable[[Case], int]
    module: str


def minimal_bytes(op: OpBench, case: Case) -> int:
    """Bytes of one call in ``case.mode``: forward, backward, or their sum."""
    forward = op.forward_bytes(case) if case.mode != "backward" else 0
    backward = op.backward_bytes(case) if case.mode != "forward" else 0
    return forward + backward


def _numel(case: Case) -> int:
    return math.prod(case.shape)


def _itemsize(case: Case) -> int:
    return torch.empty((), dtype=case.dtype).element_size()


@functools.lru_cache(maxsize=None)
def _schedule(device: torch.device) -> genfast.NoiseSchedule:
    """The linear 1000-step schedule on ``device``, built once and passed in the inputs (not built while traced)."""
    return genfast.NoiseSchedule.linear(NUM_STEPS).to(device)


def _randn(case: Case, device, grad: bool, *, scale: float = 1.0, shape=None) -> Tensor:
    return (torch.randn(shape or case.shape, device=device, dtype=case.dtype) * scale).requires_grad_(grad)


# ---- reparameterize_kl: z = μ + exp(½·logvar)·ε, kl_b = ½·Σ(μ² + e^logvar − 1 − logvar) --------------------------
# forward: read μ, logvar, write z (3·N·s) and kl (4·B); backward: read dz, μ, logvar, write dμ, dlogvar (5·N·s),
# read dkl (4·B).

def _vae_inputs(case, device, grad):
    return dict(mu=_randn(case, device, grad), logvar=_randn(case, device, grad, scale=0.5))


REPARAMETERIZE_KL = OpBench(
    module=genfast.ops.reparameterize.OP,
    name="reparameterize_kl",
    inputs=_vae_inputs,
    eager=lambda inp: reparameterize.reparameterize_kl(inp["mu"], inp["logvar"]),
    genfast=lambda inp: genfast.reparameterize_kl(inp["mu"], inp["logvar"]),
    grad_names=("mu", "logvar"),
    forward_bytes=lambda c: 3 * _numel(c) * _itemsize(c) + 4 * c.shape[0],
    backward_bytes=lambda c: 5 * _numel(c) * _itemsize(c) + 4 * c.shape[0],
)


# ---- diffusion_loss: x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε, loss = mean((ε̂ − ε)²), model ε̂ = w·x_t (w a scalar parameter) --
# forward: read x_0, write x_t, read ε̂ (3·N·s); backward: read ε̂, write dε̂ (2·N·s). The model's traffic is excluded.

def _diffusion_inputs(case, device, grad):
    return dict(x0=_randn(case, device, False), schedule=_schedule(device),
                w=torch.tensor(0.5, device=device, dtype=case.dtype, requires_grad=grad))


def _diffusion_eager(inp):
    """The composite with t drawn as genfast's diffusion_loss draws it: uniform in [0, T)."""
    x0, w = inp["x0"], inp["w"]
    t = torch.randint(0, NUM_STEPS, (x0.shape[0],), device=x0.device)
    return (diffusion.diffusion_loss(lambda x_t, t: w * x_t, x0, inp["schedule"], t=t),)


def _diffusion_genfast(inp):
    w = inp["w"]
    return (genfast.diffusion_loss(lambda x_t, t: w * x_t, inp["x0"], inp["schedule"]),)


DIFFUSION_LOSS = OpBench(
    module=genfast.ops.diffusion.OP,
    name="diffusion_loss",
    inputs=_diffusion_inputs,
    eager=_diffusion_eager,
    genfast=_diffusion_genfast,
    grad_names=("w",),
    forward_bytes=lambda c: 3 * _numel(c) * _itemsize(c),
    backward_bytes=lambda c: 2 * _numel(c) * _itemsize(c),
)


# ---- q_sample (diffusers' add_noise): x_t = √ᾱ_t·x_0 + √(1−ᾱ_t)·ε -----------------------------------------------
# forward: read x_0, write x_t (2·N·s); backward: read dx_t, write dx_0 (2·N·s).

def _q_sample_inputs(case, device, grad):
    t = torch.randint(0, NUM_STEPS, (case.shape[0],), device=device)
    return dict(x0=_randn(case, device, grad), t=t, schedule=_schedule(device))


Q_SAMPLE = OpBench(
    module=genfast.ops.diffusion.OP,
    name="q_sample",
    inputs=_q_sample_inputs,
    eager=lambda inp: (diffusion.q_sample(inp["x0"], inp["t"], inp["schedule"]),),
    genfast=lambda inp: (genfast.q_sample(inp["x0"], inp["t"], inp["schedule"]),),
    grad_names=("x0",),
    forward_bytes=lambda c: 2 * _numel(c) * _itemsize(c),
    backward_bytes=lambda c: 2 * _numel(c) * _itemsize(c),
)


# ---- sampler steps: x_prev = A·x_t + B·ε̂ + C·clamp(x̂₀, −1, 1) (+ σ_t·z), diffusers' default clipping ------------
# forward: read ε̂, x_t, write x_prev (3·N·s); backward: read dx_prev, ε̂, x_t (for the clipping's mask), write dε̂,
# dx_t (5·N·s).

def _step_inputs(case, device, grad):
    t = torch.randint(DDIM_STRIDE, NUM_STEPS, (case.shape[0],), device=device)
    return dict(eps=_randn(case, device, grad), x_t=_randn(case, device, grad), t=t, schedule=_schedule(device))


def _step_bytes(case):
    return 3 * _numel(case) * _itemsize(case)


def _step_backward_bytes(case):
    return 5 * _numel(case) * _itemsize(case)


DDPM_STEP = OpBench(
    module=genfast.ops.diffusion.OP,
    name="ddpm_step",
    inputs=_step_inputs,
    eager=lambda inp: (diffusion.ddpm_step(inp["eps"], inp["t"], None, inp["x_t"], inp["schedule"]),),
    genfast=lambda inp: (genfast.ddpm_step(inp["eps"], inp["t"], inp["x_t"], inp["schedule"]),),
    grad_names=("eps", "x_t"),
    forward_bytes=_step_bytes,
    backward_bytes=_step_backward_bytes,
)

# DDIM with η = 0 from t to t − DDIM_STRIDE (t ≥ DDIM_STRIDE, so ᾱ_prev is a table entry).
DDIM_STEP = OpBench(
    module=genfast.ops.diffusion.OP,
    name="ddim_step",
    inputs=_step_inputs,
    eager=lambda inp: (diffusion.ddim_step(inp["eps"], inp["t"], inp["t"] - DDIM_STRIDE, inp["x_t"],
                                           inp["schedule"], eta=0.0),),
    genfast=lambda inp: (genfast.ddim_step(inp["eps"], inp["t"], inp["t"] - DDIM_STRIDE, inp["x_t"],
                                           inp["schedule"], eta=0.0),),
    grad_names=("eps", "x_t"),
    forward_bytes=_step_bytes,
    backward_bytes=_step_backward_bytes,
)


# ---- group_norm_silu: y = silu(GroupNorm(x + add)·(1 + scale) + shift), G = 32 -----------------------------------
# forward: read x, write y (2·N·s) plus the side tensors P = (weight, bias: 2·C; add: B·C; scale, shift: 2·B·C)·s;
# backward: read dy, x, write dx (3·N·s), read and write the side tensors' gradients (2·P).
GROUP_NORM_VARIANTS = ("plain", "add", "scale_shift")
LAYOUTS = ("nchw", "nhwc")


def _side_numel(case):
    batch, channels = case.shape[:2]
    conditioning = {"plain": 0, "add": batch * channels, "scale_shift": 2 * batch * channels}[case.variant]
    return 2 * channels + conditioning


def _group_norm_inputs(case, device, grad):
    batch, channels = case.shape[:2]
    x = torch.randn(case.shape, device=device, dtype=case.dtype)
    if case.layout == "nhwc":
        x = x.contiguous(memory_format=torch.channels_last)
    inp = dict(x=x.requires_grad_(grad), weight=_randn(case, device, grad, shape=(channels,)),
               bias=_randn(case, device, grad, shape=(channels,)))
    names = {"plain": (), "add": ("add",), "scale_shift": ("scale", "shift")}[case.variant]
    for name in names:
        inp[name] = _randn(case, device, grad, scale=0.1, shape=(batch, channels))
    return inp


def _group_norm_call(fn: Callable) -> Callable[[dict], tuple]:
    return lambda inp: (fn(inp["x"], NUM_GROUPS, inp["weight"], inp["bias"], add=inp.get("add"),
                           scale=inp.get("scale"), shift=inp.get("shift")),)


GROUP_NORM_SILU = OpBench(
    module=genfast.ops.group_norm_silu.OP,
    name="group_norm_silu",
    inputs=_group_norm_inputs,
    eager=_group_norm_call(group_norm_silu.group_norm_silu),
    genfast=_group_norm_call(genfast.group_norm_silu),
    grad_names=("x", "weight", "bias", "add", "scale", "shift"),
    forward_bytes=lambda c: (2 * _numel(c) + _side_numel(c)) * _itemsize(c),
    backward_bytes=lambda c: (3 * _numel(c) + 2 * _side_numel(c)) * _itemsize(c),
)


# ---- gradient_penalty: x̂ = α·real + (1−α)·fake, g = ∇_x̂ Σ critic(x̂), p = 10·mean_b(‖g_b‖ − 1)² ---------------
# critic(x) = ½·Σ w·x² per sample (w of shape (C, H, W): g = w·x̂ depends on x̂ and w, so the backward reaches w
# through the second-order path). forward: read real, fake, write x̂, read g (4·N·s); backward: read g, write dg
# (2·N·s). The critic's traffic is excluded.

def _penalty_inputs(case, device, grad):
    return dict(real=_randn(case, device, False), fake=_randn(case, device, False),
                w=_randn(case, device, grad, shape=case.shape[1:]))


def _critic(w: Tensor) -> Callable[[Tensor], Tensor]:
    return lambda x: 0.5 * (w * x.square()).flatten(1).sum(1)


def _penalty_call(fn: Callable) -> Callable[[dict], tuple]:
    return lambda inp: (fn(_critic(inp["w"]), inp["real"], inp["fake"], weight=PENALTY_WEIGHT),)


GRADIENT_PENALTY = OpBench(
    module=genfast.ops.gradient_penalty.OP,
    name="gradient_penalty",
    inputs=_penalty_inputs,
    eager=_penalty_call(gradient_penalty.gradient_penalty),
    genfast=_penalty_call(genfast.gradient_penalty),
    grad_names=("w",),
    forward_bytes=lambda c: 4 * _numel(c) * _itemsize(c),
    backward_bytes=lambda c: 2 * _numel(c) * _itemsize(c),
)

OPS = {op.name: op for op in (REPARAMETERIZE_KL, DIFFUSION_LOSS, Q_SAMPLE, DDPM_STEP, DDIM_STEP, GROUP_NORM_SILU,
                              GRADIENT_PENALTY)}


# ---- the shapes ----------------------------------------------------------------------------------------------
# VAE latents (B, D) and latent maps; DDPM U-Net activations; WGAN critic inputs (64x64 RGB batches).
VAE_SHAPES = ((256, 128), (4096, 512), (8, 4, 64, 64))
IMAGE_SHAPES = ((64, 3, 64, 64), (8, 4, 64, 64), (16, 3, 256, 256))
UNET_SHAPES = ((64, 128, 64, 64), (64, 256, 32, 32), (16, 512, 16, 16), (1, 512, 256, 256),
               (32, 256, 32, 32), (8, 128, 64, 64))
CRITIC_SHAPES = ((64, 3, 64, 64), (256, 3, 64, 64))


def full_cases() -> list[Case]:
    """Every op, shape, variant, layout and mode (for GPUs)."""
    cases = []
    for mode in MODES:
        cases += [Case("reparameterize_kl", s, mode) for s in VAE_SHAPES]
        cases += [Case(op, s, mode) for op in ("diffusion_loss", "q_sample", "ddpm_step", "ddim_step")
                  for s in IMAGE_SHAPES]
        cases += [Case("group_norm_silu", s, mode, variant, layout)
                  for s in UNET_SHAPES for variant in GROUP_NORM_VARIANTS for layout in LAYOUTS]
        cases += [Case("gradient_penalty", s, mode) for s in CRITIC_SHAPES]
    return cases


# The C++ CPU backend's target rows (its numbers come from this suite), which --quick always runs.
TARGET_CASES = tuple(
    [Case("group_norm_silu", s, mode, "plain", layout) for s in ((32, 256, 32, 32), (8, 128, 64, 64))
     for layout in LAYOUTS for mode in ("forward", "forward+backward")]
    + [Case("reparameterize_kl", (4096, 512), "forward+backward"),
       Case("diffusion_loss", (64, 3, 64, 64), "forward+backward")]
)


def quick_cases() -> list[Case]:
    """The target rows plus one row per remaining op and variant, at sizes a 2-core CPU times in seconds."""
    return list(TARGET_CASES) + [
        Case("group_norm_silu", (8, 128, 64, 64), "forward+backward", "add", "nchw"),
        Case("group_norm_silu", (8, 128, 64, 64), "forward+backward", "scale_shift", "nchw"),
        Case("reparameterize_kl", (4096, 512), "forward"),
        Case("diffusion_loss", (64, 3, 64, 64), "forward"),
        Case("q_sample", (64, 3, 64, 64), "forward"),
        Case("ddpm_step", (64, 3, 64, 64), "forward"),
        Case("ddim_step", (64, 3, 64, 64), "forward"),
        Case("gradient_penalty", (64, 3, 64, 64), "forward+backward"),
    ]


# In --quick mode torch.compile (10-15 s per compiled function on a 2-core CPU) runs on these rows only.
QUICK_COMPILE_CASES = (
    Case("group_norm_silu", (8, 128, 64, 64), "forward+backward", "plain", "nchw"),
    Case("reparameterize_kl", (4096, 512), "forward+backward"),
    Case("diffusion_loss", (64, 3, 64, 64), "forward+backward"),
    Case("q_sample", (64, 3, 64, 64), "forward"),
)
