"""The C++ kernels give bitwise the same results for any number of threads (`make test` runs each xdist worker on
one thread, so this is where the at::parallel_for splits are exercised): fixed block sizes, partial sums added in
a fixed order, no atomics."""
import pytest
import torch

import genfast
from backends import skip_reason

_REASON = skip_reason("cpp")
pytestmark = pytest.mark.skipif(_REASON is not None, reason=_REASON or "")


def _group_norm(x, weight, bias, add, scale, shift, gen):
    y = genfast.group_norm_silu(x, 4, weight, bias, add=add, scale=scale, shift=shift)
    grad_y = torch.randn(y.shape, generator=gen)
    return y, torch.autograd.grad(y, (x, weight, bias, add, scale, shift), grad_y)


def _vae(mu, logvar, gen):
    z, kl = genfast.reparameterize_kl(mu, logvar, generator=gen)
    return z, torch.autograd.grad((z.square().sum(), kl.sum()), (mu, logvar))


def _diffusion(x0, eps_hat, gen):
    schedule = genfast.NoiseSchedule.linear(100)
    loss = genfast.diffusion_loss(lambda x_t, t: eps_hat + 0.1 * x_t, x0, schedule, generator=gen)
    return loss, torch.autograd.grad(loss, (x0, eps_hat))


def _run(fn, threads, shapes, layout):
    """fn on fresh inputs from a fixed generator, with ``threads`` intra-op threads."""
    previous = torch.get_num_threads()
    torch.set_num_threads(threads)
    try:
        gen = torch.Generator().manual_seed(1)
        tensors = [torch.randn(s, generator=gen) for s in shapes]
        if layout == "channels_last":
            tensors[0] = tensors[0].contiguous(memory_format=torch.channels_last)
        with genfast.use_backend("cpp"):
            return fn(*[t.requires_grad_() for t in tensors], gen)
    finally:
        torch.set_num_threads(previous)


def _flatten(result):
    out = []
    for r in result:
        out.extend(_flatten(r) if isinstance(r, (tuple, list)) else [r])
    return out


C = 32
CASES = {
    # several blocks of 2048 per sample and several samples, so every thread gets work
    "group_norm_silu": (_group_norm, [(6, C, 17, 19), (C,), (C,), (6, C), (6, C), (6, C)]),
    "reparameterize_kl": (_vae, [(64, 700), (64, 700)]),
    "diffusion_loss": (_diffusion, [(8, 3, 40, 40), (8, 3, 40, 40)]),
}


@pytest.mark.parametrize("layout", ["contiguous", "channels_last"])
@pytest.mark.parametrize("case", sorted(CASES))
def test_results_do_not_depend_on_the_thread_count(case, layout):
    fn, shapes = CASES[case]
    if layout == "channels_last" and len(shapes[0]) != 4:
        pytest.skip("channels_last needs a 4-dim input")
    one = _flatten(_run(fn, 1, shapes, layout))
    for threads in (2, 3):
        many = _flatten(_run(fn, threads, shapes, layout))
        for a, b in zip(one, many):
            assert torch.equal(a, b), f"{case}: {threads} threads differ from 1"
