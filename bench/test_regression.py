"""Small CPU cases under pytest-benchmark: a regression baseline per op and implementation
(``pytest bench/ -p no:xdist --benchmark-json out.json``; compare runs with ``--benchmark-compare``). Each test is
ROUNDS timed calls after one warm-up, so the set takes seconds, not minutes."""
import pytest

from genfast.bench import ops, runner

ROUNDS = 10

CASES = [
    ops.Case("reparameterize_kl", (256, 128), "forward+backward"),
    ops.Case("diffusion_loss", (16, 3, 32, 32), "forward+backward"),
    ops.Case("ddpm_step", (16, 3, 32, 32), "forward"),
    ops.Case("ddim_step", (16, 3, 32, 32), "forward"),
    ops.Case("group_norm_silu", (4, 64, 32, 32), "forward+backward", "plain", "nchw"),
    ops.Case("group_norm_silu", (4, 64, 32, 32), "forward+backward", "add", "nhwc"),
    ops.Case("group_norm_silu", (4, 64, 32, 32), "forward+backward", "scale_shift", "nchw"),
    ops.Case("gradient_penalty", (16, 3, 32, 32), "forward+backward"),
]


@pytest.mark.parametrize("case", CASES, ids=lambda c: c.label.replace(" ", "-"))
def test_op(benchmark, case, impl, cpu):
    op = ops.OPS[case.op]
    call = runner.make_call(op, case, runner.implementation(op, impl), cpu)
    benchmark.extra_info.update(bytes=ops.minimal_bytes(op, case), mode=case.mode)
    benchmark.pedantic(call, rounds=ROUNDS, warmup_rounds=1)
