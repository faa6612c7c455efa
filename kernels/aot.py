"""Ahead-of-time compile variants of the Triton kernels, their signatures read off the kernels' own parameters.

A runtime parameter's type is ``*{dtype}`` for a pointer (a name ending in ``_ptr``) and ``i32`` for any other,
unless the module's table of argument types says otherwise. Runtime ints that the JIT specialises to the constant 1
(a unit stride) compile as constexprs equal to 1.
"""
import inspect

import triton.language as tl


def runtime_params(kernel) -> list[str]:
    """The names of ``kernel``'s parameters that are not ``tl.constexpr``, in order."""
    params = inspect.signature(kernel.fn).parameters.values()
    return [p.name for p in params if p.annotation is not tl.constexpr]


def signature(kernel, dtype: str, types: dict[str, str]) -> dict[str, str]:
    """{name: type} of ``kernel``'s runtime parameters for data of ``dtype``: ``types[name]`` where given, else
    ``*{dtype}`` for a pointer and ``i32`` for an int."""
    return {name: types.get(name, f"*{dtype}" if name.endswith("_ptr") else "i32") for name in runtime_params(kernel)}


def variants(kernel, dtype: str, constexprs: dict, num_warps: int, types: dict[str, str], unit_args=((),)):
    """(kernel, signature, constexprs, num_warps) for each entry of ``unit_args``: a tuple of runtime ints the JIT
    sees equal to 1, which leave the signature for the constexprs. Names the kernel lacks are dropped, and entries
    that then coincide compile once."""
    sig = signature(kernel, dtype, types)
    for ones in dict.fromkeys(tuple(name for name in ones if name in sig) for ones in unit_args):
        yield (kernel, {name: ty for name, ty in sig.items() if name not in ones},
               dict(constexprs, **dict.fromkeys(ones, 1)), num_warps)
