"""Triton kernels of genfast, installed as ``genfast.kernels``: one module per fused op, each holding its forward
kernel, its backward kernels and a thin launcher. Imported lazily by ``genfast.ops`` when the Triton backend runs."""
