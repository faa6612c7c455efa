"""Compile every variant of one genfast.kernels module for one GPU arch, ahead of time, without a GPU.

Run as ``python tests/aot_compile.py MODULE ARCH`` in a process without TRITON_INTERPRET (the interpreter replaces
``@triton.jit``). Prints one line per variant; exits 1 on any compile error or local-memory spill in the PTX.
"""
import importlib
import sys

import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource


def compile_variant(kernel, signature, constexprs, num_warps, arch):
    """Compile as the JIT does for fresh tensors of sizes that are multiples of 16: the JIT specialises pointers
    that are 16-byte aligned and integers divisible by 16 (the vectorised case whose PTX is worth reading), except
    the arguments in the kernel's ``do_not_specialize``. Attributes are keyed by the argument's position in the
    kernel's parameter list, where a constexpr may sit between runtime arguments (a unit stride)."""
    specialized = {p.name for p in kernel.params if not p.do_not_specialize}
    aligned = {(kernel.arg_names.index(name),): [["tt.divisibility", 16]] for name, ty in signature.items()
               if name in specialized and (ty.startswith("*") or ty in ("i32", "i64"))}
    signature = dict(signature, **{name: "constexpr" for name in constexprs})
    src = ASTSource(fn=kernel, signature=signature, constexprs=dict(constexprs), attrs=aligned)
    return triton.compile(src, target=GPUTarget("cuda", arch, 32), options={"num_warps": num_warps})


def main(module_name: str, arch: int) -> int:
    module = importlib.import_module(f"genfast.kernels.{module_name}")
    failures = 0
    count = 0
    vectorized = 0
    for kernel, signature, constexprs, num_warps in module.aot_variants():
        count += 1
        what = f"{kernel.fn.__name__} {constexprs} num_warps={num_warps} sm_{arch}"
        try:
            compiled = compile_variant(kernel, signature, constexprs, num_warps, arch)
        except Exception as exc:  # report every failing variant, not just the first
            failures += 1
            print(f"FAIL {what}: {type(exc).__name__}: {exc}")
            continue
        ptx = compiled.asm["ptx"]
        if "ld.local" in ptx or "st.local" in ptx:
            failures += 1
            print(f"SPILL {what}: local-memory loads/stores in the PTX")
        elif not compiled.asm.get("cubin"):
            failures += 1
            print(f"FAIL {what}: no cubin")
        vectorized += ".v4." in ptx or ".v2.b32" in ptx
    print(f"{module_name} sm_{arch}: {count} variants, {failures} failed, {vectorized} with vector loads/stores")
    return 1 if failures or not count else 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1], int(sys.argv[2])))
