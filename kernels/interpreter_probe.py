"""Whether Triton's interpreter (TRITON_INTERPRET=1, the Triton backend on CPU tensors) runs the kernels' loops
with this numpy: Triton 3.6's interpreter converts a runtime loop bound with ``int()`` of a one-element array,
which numpy ≥ 2.4 refuses (later Triton releases squeeze the array first). Every tile loop over a runtime size
would stop with a TypeError inside a kernel; the backend table says so instead (``genfast._backend.why_not``)."""
import numpy as np
import torch
import triton
import triton.language as tl


@triton.jit
def _runtime_bound_loop(out_ptr, n):
    count = 0
    for _ in range(n):
        count += 1
    tl.store(out_ptr, count)


def interpreter_error() -> str | None:
    """None where the interpreter runs a loop over a runtime bound here, else why not (one sentence)."""
    out = torch.zeros(1, dtype=torch.int32)
    try:
        _runtime_bound_loop[(1,)](out, 3)
    except Exception as exc:  # Triton wraps the TypeError in its InterpreterError
        return (f"Triton {triton.__version__}'s interpreter cannot run the kernels' loops with numpy "
                f"{np.__version__} ({exc}; a Triton release after 3.6, or numpy < 2.4, runs them)")
    return None if int(out) == 3 else f"Triton {triton.__version__}'s interpreter miscounted a loop ({int(out)} of 3)"
