"""What a GPU would run, found without one: the launches an op call makes, each Triton launch compiled for sm_90
exactly as the JIT would build it, and its machine code read.

- :func:`record_launches` runs ops with every Triton launch recorded instead of run. The JIT's own binder turns the
  real arguments into the specialisation it would compile (integers divisible by 16 or equal to 1, pointers 16-byte
  aligned or not), so the variant compiled here is the one a GPU run builds. A dispatch mode counts the torch
  kernels of the call too (every ATen op but views and allocations).
- :func:`compile_launch` compiles a recorded launch for sm_90 (``triton.compile``, cached per variant).
- :func:`read` reads registers, spills and shared memory (``cuobjdump --dump-resource-usage``), counts the SASS
  instructions (``cuobjdump -sass``) and reads the PTX: every global load and store with its width, whether it is
  a tile access (a dataflow pass: its address derives from the thread index and from one of the pointers the
  kernel module lists in ``STREAMED``, the op's tensors) and whether it sits in a loop (a backward branch).
"""
from __future__ import annotations

import contextlib
import functools
import math
import re
import subprocess
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch.utils._python_dispatch import TorchDispatchMode

ARCH = 90
_NOT_LAUNCHES = ("empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "detach", "lift_fresh",
                 "resize_", "set_")  # ATen ops that launch no GPU kernel (views are found by OpOverload.is_view)


@dataclass
class Launch:
    """One recorded Triton launch: the kernel, its grid and what the JIT would compile for these arguments."""
    kernel: object
    grid: tuple
    signature: dict
    constexprs: dict
    attrs: dict
    options: object
    ints: dict  # the runtime int arguments by name (the split path's per_split: its tile loop's trip count)

    @property
    def name(self) -> str:
        return self.kernel.fn.__name__

    @property
    def programs(self) -> int:
        return math.prod(self.grid)

    def constant(self, name: str, default=None):
        """The value of the constexpr ``name`` (looked up by the kernel's parameter position)."""
        if name not in self.kernel.arg_names:
            return default
        return self.constexprs.get((self.kernel.arg_names.index(name),), default)

    def key(self) -> tuple:
        return (self.kernel, repr(sorted(self.signature.items())), repr(sorted(self.constexprs.items())),
                repr(sorted(self.attrs.items())), repr(sorted(vars(self.options).items())))


@dataclass
class Recording:
    triton: list = field(default_factory=list)
    torch_ops: list = field(default_factory=list)


def _target():
    from triton.backends.compiler import GPUTarget
    return GPUTarget("cuda", ARCH, 32)


@functools.lru_cache(maxsize=None)
def _backend():
    from triton.compiler import make_backend
    return make_backend(_target())


class _CountTorchKernels(TorchDispatchMode):
    """Records the ATen ops that would launch a GPU kernel; genfast's custom ops are entered, not counted."""

    def __init__(self, recording: Recording):
        super().__init__()
        self.recording = recording

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        kwargs = kwargs or {}
        if func.namespace == "genfast":
            from torch._library.custom_ops import _maybe_get_opdef
            opdef = _maybe_get_opdef(func)
            if opdef is not None:  # run its Python implementation with this mode still counting
                with self:
                    return opdef._init_fn(*args, **kwargs)
        if not func.is_view and func._opname not in _NOT_LAUNCHES:
            self.recording.torch_ops.append(str(func))
        return func(*args, **kwargs)


@contextlib.contextmanager
def record_launches():
    """Within the block, Triton launches are recorded (not run) and torch kernels counted; yields the Recording.
    Needs the compiling JIT (no TRITON_INTERPRET=1)."""
    from triton.runtime.jit import JITFunction, create_function_from_signature

    recording = Recording()
    run = JITFunction.run

    def record(self, *args, grid, warmup, **kwargs):
        kwargs["debug"] = kwargs.get("debug", self.debug)
        binder = create_function_from_signature(self.signature, self.params, _backend())
        bound, specialization, options = binder(*args, **kwargs)
        options, signature, constexprs, attrs = self._pack_args(_backend(), kwargs, bound, specialization, options)
        grid = grid(bound) if callable(grid) else tuple(grid)
        ints = {k: v for k, v in bound.items() if isinstance(v, int) and not isinstance(v, bool)}
        recording.triton.append(Launch(self, tuple(int(g) for g in grid), signature, constexprs, attrs, options,
                                       ints))

    JITFunction.run = record
    try:
        with _CountTorchKernels(recording):
            yield recording
    finally:
        JITFunction.run = run


_compiled: dict = {}


def compile_launch(launch: Launch):
    """The sm_90 compile of ``launch``'s variant (one per distinct specialisation)."""
    key = launch.key()
    if key not in _compiled:
        import triton
        from triton.compiler import ASTSource
        src = ASTSource(launch.kernel, launch.signature, launch.constexprs, launch.attrs)
        _compiled[key] = triton.compile(src, target=_target(), options=launch.options.__dict__)
    return _compiled[key]


# ---- reading the machine code -------------------------------------------------------------------------------
@dataclass
class Access:
    store: bool
    width: int  # bytes per thread per instruction
    tile: bool  # its address derives from one of the kernel's streamed pointers (the module's STREAMED)
    in_loop: bool  # inside a loop (a backward branch) of the PTX


@dataclass
class MachineCode:
    registers: int
    spill_bytes: int  # local memory: stack + spill
    shared: int
    sass_instructions: int  # static count, NOPs and the trailing self-branch left out
    ptx_instructions: int  # static count
    tile_loop_instructions: int  # PTX instructions in the loops that hold tile accesses
    accesses: list  # Access per global load and store of the PTX
    local_accesses: int = 0  # SASS local-memory loads and stores (STL, LDL)


def _tool(name: str) -> str:
    from triton.backends.nvidia import __file__ as nvidia
    return str(Path(nvidia).parent / "bin" / name)


_REGISTER = re.compile(r"%[a-z]+\d+")
_PARAM = re.compile(r"\[(\w+)_param_(\d+)\]")
_VECTOR = re.compile(r"\.v(\d)")
_BITS = re.compile(r"\.[bfsu](\d+)\b")
_SASS = re.compile(r"/\*[0-9a-f]{4,}\*/\s+(?:@!?U?P\w+\s+)?([A-Z][A-Z0-9_.]*)([^;]*);")


def _ptx_body(ptx: str) -> list[str]:
    """The PTX instructions and labels of the kernel, in order, without directives and comments."""
    body = ptx[ptx.index("{", ptx.index(".entry")) + 1:]
    out = []
    for line in body.splitlines():
        line = line.split("//")[0].strip()
        if line and not line.startswith((".", "{", "}")):
            out.append(line)
    return out


def _taints(instructions: list[str], params: list[str]) -> dict:
    """{register: the kernel parameters its value derives from, and "%tid" if it depends on the thread index}: a
    forward dataflow pass over the PTX, repeated until loop-carried registers settle."""
    taint: dict = {}
    changed = True
    while changed:
        changed = False
        for line in instructions:
            text = line.split(None, 1)[1] if line.startswith("@") else line
            opcode, _, operands = text.partition(" ")
            if opcode.startswith(("st.", "bra", "ret", "bar")) or line.endswith(":"):
                continue
            regs = _REGISTER.findall(operands)
            if not regs:
                continue
            n_dst = len(_REGISTER.findall(operands.split("}")[0])) if operands.lstrip().startswith("{") else 1
            sources = set().union(*(taint.get(r, set()) for r in regs[n_dst:]))
            if m := _PARAM.search(operands):
                index = int(m.group(2))
                sources |= {params[index]} if index < len(params) else set()
            if "%tid." in operands:
                sources |= {"%tid"}
            for r in regs[:n_dst]:
                if not sources <= taint.get(r, set()):
                    taint[r] = taint.get(r, set()) | sources
                    changed = True
    return taint


def _width(opcode: str) -> int:
    vector = _VECTOR.search(opcode)
    bits = _BITS.findall(opcode)
    return (int(vector.group(1)) if vector else 1) * (int(bits[-1]) // 8 if bits else 4)


def read_ptx(ptx: str, params: list[str], streamed: tuple) -> tuple[int, int, list]:
    """(instructions, instructions in tile loops, global accesses) of a kernel's PTX; ``params`` names its PTX
    parameters in order, ``streamed`` the pointers whose accesses are the op's tensor traffic."""
    lines = _ptx_body(ptx)
    labels = {line[:-1]: i for i, line in enumerate(lines) if line.endswith(":")}
    loops = [(labels[target], i) for i, line in enumerate(lines)
             if (m := re.search(r"\bbra(?:\.uni)?\s+(\$\w+)", line)) and (target := m.group(1)) in labels
             and labels[target] < i]
    taint = _taints(lines, params)
    accesses, tile_lines = [], set()
    for i, line in enumerate(lines):
        text = line.split(None, 1)[1] if line.startswith("@") else line
        opcode, _, operands = text.partition(" ")
        if not opcode.startswith(("ld.global", "st.global")):
            continue
        address = re.search(r"\[\s*(%\w+)", operands)
        sources = taint.get(address.group(1), set()) if address else set()
        tile = "%tid" in sources and bool(sources & set(streamed))
        in_loop = any(lo <= i <= hi for lo, hi in loops)
        accesses.append(Access(opcode.startswith("st."), _width(opcode), tile, in_loop))
        if tile:
            tile_lines.add(i)
    tile_loops = [(lo, hi) for lo, hi in loops if any(lo <= i <= hi for i in tile_lines)]
    count = sum(1 for line in lines if not line.endswith(":"))
    in_tile_loops = sum(1 for i, line in enumerate(lines) if not line.endswith(":")
                        and any(lo <= i <= hi for lo, hi in tile_loops))
    return count, in_tile_loops, accesses


def read(compiled, launch: Launch, streamed: tuple, workdir: Path) -> MachineCode:
    """Registers, spills and shared memory (cuobjdump), the SASS instruction count, and the PTX's accesses."""
    path = workdir / "kernel.cubin"
    path.write_bytes(compiled.asm["cubin"])
    usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(path)], capture_output=True, text=True,
                           check=True).stdout
    fields = dict(re.findall(r"(\w+):(\d+)", usage.split("Function", 1)[-1]))
    sass = subprocess.run([_tool("cuobjdump"), "-sass", str(path)], capture_output=True, text=True, check=True).stdout
    opcodes = [m.group(1) for m in _SASS.finditer(sass)]
    while opcodes and opcodes[-1] in ("NOP", "BRA"):  # the padding and the self-branch after the last EXIT
        opcodes.pop()
    params = [name for name, ty in launch.signature.items() if ty != "constexpr"]
    count, in_loops, accesses = read_ptx(compiled.asm["ptx"], params, streamed)
    return MachineCode(int(fields.get("REG", 0)), int(fields.get("STACK", 0)) + int(fields.get("LOCAL", 0)),
                       int(fields.get("SHARED", 0)), sum(1 for op in opcodes if op != "NOP"), count, in_loops,
                       accesses, sum(1 for op in opcodes if op.startswith(("STL", "LDL"))))


# ---- the CUDA C++ kernels -------------------------------------------------------------------------------------
def cuda_kernels(source: Path, workdir: Path) -> list[dict]:
    """Each ``__global__`` function of a CUDA C++ source compiled for sm_90 (nvcc, the flags of the extension
    build): registers, local memory, the widths of its global loads and stores in the SASS, and its calls (64-bit
    integer division and modulo are subroutine calls on the GPU)."""
    import shutil
    from torch.utils import cpp_extension

    nvcc = shutil.which("nvcc")
    if nvcc is None:
        raise RuntimeError("nvcc is not installed")
    cubin = workdir / (source.stem + ".cubin")
    includes = [f"-I{p}" for p in cpp_extension.include_paths()]
    subprocess.run([nvcc, "-cubin", str(source), "-o", str(cubin), "-std=c++20", "-O3",
                    "-gencode", f"arch=compute_{ARCH},code=sm_{ARCH}", *cpp_extension.COMMON_NVCC_FLAGS, *includes],
                   capture_output=True, text=True, check=True)
    usage = subprocess.run([_tool("cuobjdump"), "--dump-resource-usage", str(cubin)], capture_output=True, text=True,
                           check=True).stdout
    resources = {m.group(1): dict(re.findall(r"(\w+):(\d+)", m.group(2)))
                 for m in re.finditer(r"Function (\S+):\s*\n\s*(REG.*)", usage)}
    sass = subprocess.run([_tool("cuobjdump"), "-sass", str(cubin)], capture_output=True, text=True, check=True).stdout
    out = []
    for name, body in re.findall(r"Function : (\S+)\n(.*?)(?=\n\s*Function : |\Z)", sass, re.S):
        opcodes = [m.group(1) for m in _SASS.finditer(body)]
        widths = lambda prefix: sorted({_width_sass(op) for op in opcodes if op.startswith(prefix)})
        demangled = subprocess.run(["c++filt", name], capture_output=True, text=True).stdout.strip() or name
        fields = resources.get(name, {})
        out.append(dict(kernel=demangled, registers=int(fields.get("REG", 0)),
                        spills=int(fields.get("STACK", 0)) + int(fields.get("LOCAL", 0)),
                        load_bytes=widths("LDG"), store_bytes=widths("STG"),
                        calls=sum(1 for op in opcodes if op.startswith("CALL"))))
    return out


_SASS_WIDTHS = {"128": 16, "64": 8, "U16": 2, "S16": 2, "U8": 1, "S8": 1}


def _width_sass(opcode: str) -> int:
    return next((_SASS_WIDTHS[p] for p in opcode.split(".")[1:] if p in _SASS_WIDTHS), 4)
