"""The "torch" backend: each public op written as the plain PyTorch composite a user would write — ``torch.randn``
noise, ``F.group_norm`` → ``F.silu``, the autograd penalty — one module per op (named as its ``genfast/ops``
module), with the public function's arguments after its checks. It is the baseline of every benchmark ("eager",
and "compile" is torch.compile of it) and runs on any device and dtype. Its noise comes from torch's generator
(the one given, else the device's default), so it does not share the Philox stream of the other backends."""
