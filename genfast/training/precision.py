"""How a training step runs: autocast precision, fp16 loss scaling, torch.compile and the random stream of a compiled
step. Each is a run setting (``--precision``, ``--compile``) saved in the checkpoint."""
from __future__ import annotations

import contextlib

import torch

PRECISIONS = ("fp32", "bf16", "fp16")
DTYPES = {"bf16": torch.bfloat16, "fp16": torch.float16}


def default_precision(device: torch.device) -> str:
    """bf16 on a CUDA GPU that runs it natively (Ampere and later), fp32 elsewhere (the CPU, older GPUs)."""
    if device.type == "cuda" and torch.cuda.is_bf16_supported(including_emulation=False):
        return "bf16"
    return "fp32"


def precision_reason(precision: str, device: torch.device) -> str | None:
    """Why ``precision`` cannot run on ``device``, or None."""
    if precision not in PRECISIONS:
        return f"expected one of {', '.join(PRECISIONS)}, got {precision!r}"
    if precision == "bf16" and device.type == "cuda" and not torch.cuda.is_bf16_supported(including_emulation=False):
        return f"{torch.cuda.get_device_name(device)} has no native bfloat16 (use fp16 or fp32)"
    return None


def autocast(precision: str, device: torch.device):
    """``torch.autocast`` to the precision's dtype on ``device`` (convolutions and matmuls in bf16/fp16, reductions
    and losses in fp32; parameters and optimiser state stay fp32); a no-op for fp32. genfast's ops take the
    activations in the dtype they arrive in and keep their statistics in fp32."""
    if precision == "fp32":
        return contextlib.nullcontext()
    return torch.autocast(device.type, dtype=DTYPES[precision])


def grad_scaler(precision: str, device: torch.device) -> torch.amp.GradScaler | None:
    """A dynamic loss scaler for fp16 (gradients scaled by s = 2¹⁶ at first, halved on an inf/NaN gradient, whose
    step is skipped, and doubled after 2000 good steps), None otherwise."""
    return torch.amp.GradScaler(device.type) if precision == "fp16" else None


def compiled(module: torch.nn.Module, backend: str | None, *, fullgraph: bool) -> torch.nn.Module:
    """``torch.compile(module, backend=backend, fullgraph=fullgraph)``, or ``module`` itself when backend is None."""
    if backend is None:
        return module
    return torch.compile(module, backend=backend, fullgraph=fullgraph)


def compile_backends() -> list[str]:
    """The torch.compile backends of ``--compile``: torch's (``inductor``, ``cudagraphs``, ...) and the two
    debugging ones, ``aot_eager`` (AOTAutograd's graphs run eagerly: the tracing without code generation) and
    ``eager``."""
    import torch._dynamo

    return sorted(set(torch._dynamo.list_backends()) | {"aot_eager", "eager"})


@contextlib.contextmanager
def seeded_default_generators(generator: torch.Generator, device: torch.device):
    """Torch's default generators (the CPU's and ``device``'s) seeded from one draw of ``generator`` for the block,
    and restored after it. A compiled step draws its randomness inside the graph from the default generators (a
    ``torch.Generator`` argument would break the graph); so its draws still come from the run's own stream,
    per process, and a resumed run repeats them."""
    seed = int(torch.randint(0, 2**62, (1,), generator=generator, device=generator.device))
    devices = [device] if device.type == "cuda" else []
    with torch.random.fork_rng(devices=devices, device_type=device.type if devices else "cuda"):
        torch.random.default_generator.manual_seed(seed)
        if devices:
            torch.cuda.manual_seed(seed)
        yield
