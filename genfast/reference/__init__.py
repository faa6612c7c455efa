"""Pure-PyTorch references of every fused op, one module per op (named as the op's ``genfast/ops`` module): plain
forward *and* explicit backward formulas, the fallback on any device and the oracle of the kernels."""
