"""GPU-only checks (marked `gpu`, skipped without CUDA; `make gpu-check` runs them with TRITON_INTERPRET=0): the
compiled Triton kernels and the CUDA C++ kernels (the "cpp" backend's GroupNorm + SiLU) against the reference on the
device, forward and backward with random upstream gradients (gradients compared by relative norm as well), in
fp32/bf16/fp16; GroupNorm in NCHW and NHWC with 4, 8, 10 and 16 channels per group; sizes past 2**31 elements;
batches past CUDA's grid limit of 65,535; two runs bitwise equal; torch.compile(fullgraph=True) of every op, its
compiled backward included; and CUDA-graph capture of a sampling step."""
import pytest
import torch

import genfast
from backends import KERNEL_BACKENDS, skip_unless_usable
from genfast.models import DDPM, UNet
from genfast._backend import DEVICES
from tolerances import NOISE_ATOL, TOLERANCES, assert_close, assert_close_rel_norm

pytestmark = pytest.mark.gpu
DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def _gpu_backends(op):
    """The kernel backends with CUDA kernels for ``op`` (the backend table's DEVICES)."""
    return [name for name in KERNEL_BACKENDS if "cuda" in DEVICES[name][op]]


def _seeded(fn, backend, *args, **kwargs):
    """fn(*args) on ``backend`` with a freshly seeded CUDA generator (the same Philox noise on every backend)."""
    with genfast.use_backend(backend):
        return fn(*args, generator=torch.Generator(device="cuda").manual_seed(1), **kwargs)


def _assert_grad(got, want, dtype, name=None):
    """A gradient of large reductions on the device: by relative norm, and elementwise with an atol scaled by its
    largest value (fp32 sums of up to 2**16 terms, in another order than the reference's)."""
    assert got.dtype == want.dtype, name
    assert_close_rel_norm(got, want, dtype, name)
    tol = TOLERANCES[dtype]
    torch.testing.assert_close(got, want, atol=tol["atol"] * max(want.abs().max().item(), 1.0), rtol=tol["rtol"],
                               msg=name)


def _leaves(*tensors):
    return [t.detach().requires_grad_() for t in tensors]


@pytest.mark.parametrize("dtype", DTYPES)
def test_reparameterize_kl_on_gpu(dtype):
    mu = torch.randn(256, 4, 32, 32, device="cuda", dtype=dtype).to(memory_format=torch.channels_last)
    logvar = torch.randn_like(mu) * 0.3
    grad_z, grad_kl = torch.randn_like(mu), torch.randn(256, device="cuda")
    results = {}
    for backend in ("reference", "triton"):
        leaves = _leaves(mu, logvar)
        z, kl = _seeded(genfast.reparameterize_kl, backend, *leaves)
        results[backend] = (z, kl, *torch.autograd.grad((z, kl), leaves, (grad_z, grad_kl)))
    (z, kl, dmu, dlogvar), (z_ref, kl_ref, dmu_ref, dlogvar_ref) = results["triton"], results["reference"]
    sigma = logvar.float().mul(0.5).exp().max().item()
    assert_close(z, z_ref, dtype, noise_scale=sigma)
    assert_close(kl, kl_ref, torch.float32)
    _assert_grad(dmu, dmu_ref, dtype, "mu")
    assert_close_rel_norm(dlogvar, dlogvar_ref, dtype, "logvar")


def test_noise_identity_on_gpu():
    mu = torch.zeros(64, 4096, device="cuda")
    z, z_ref = (_seeded(genfast.reparameterize, backend, mu, mu) for backend in ("triton", "reference"))
    torch.testing.assert_close(z, z_ref, atol=NOISE_ATOL, rtol=0)


# G = 32 with 4, 8, 10 and 16 channels per group (C = 128, 256, 320, 512), an odd spatial size, and one group of
# 16·256² elements (the split path)
GROUP_NORM_SHAPES = [(8, 128, 32, 32), (4, 256, 16, 16), (4, 320, 7, 9), (2, 512, 16, 16), (1, 512, 256, 256)]


@pytest.mark.parametrize("backend", _gpu_backends("group_norm_silu"))
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
@pytest.mark.parametrize("shape", GROUP_NORM_SHAPES, ids=lambda s: f"cpg{s[1] // 32}-" + "x".join(map(str, s)))
def test_group_norm_silu_on_gpu(backend, shape, dtype, layout, groups=32):
    """The Triton kernels and the CUDA C++ kernels against the reference, every input differentiated."""
    skip_unless_usable(backend, "cuda", "group_norm_silu")
    x = torch.randn(shape, device="cuda", dtype=dtype).to(memory_format=layout)
    weight, bias = torch.randn(shape[1], device="cuda", dtype=dtype), torch.randn(shape[1], device="cuda", dtype=dtype)
    temb, scale = (torch.randn(shape[0], shape[1], device="cuda", dtype=dtype) for _ in range(2))
    grad_y = torch.randn(shape, device="cuda", dtype=dtype)
    results = {}
    for name in ("reference", backend):
        leaves = _leaves(x, weight, bias, temb, scale)
        with genfast.use_backend(name):
            y = genfast.group_norm_silu(leaves[0], groups, leaves[1], leaves[2], add=leaves[3], scale=leaves[4])
        results[name] = (y, *torch.autograd.grad(y, leaves, grad_y))
    assert results[backend][0].is_contiguous(memory_format=layout)
    assert_close(results[backend][0], results["reference"][0], dtype)
    for name, got, want in zip(("x", "weight", "bias", "add", "scale"), results[backend][1:],
                               results["reference"][1:]):
        _assert_grad(got, want, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES)
def test_q_sample_and_diffusion_loss_on_gpu(dtype):
    schedule = genfast.NoiseSchedule.linear().cuda()
    x0 = torch.randn(32, 3, 64, 64, device="cuda", dtype=dtype)
    t = torch.randint(0, 1000, (32,), device="cuda")
    grad = torch.randn_like(x0)
    results = {}
    for backend in ("reference", "triton"):
        (leaf,) = _leaves(x0)
        x_t = _seeded(genfast.q_sample, backend, leaf, t, schedule)
        results[backend] = (x_t, *torch.autograd.grad(x_t, leaf, grad))
    assert_close(results["triton"][0], results["reference"][0], dtype, noise_scale=1.0)
    _assert_grad(results["triton"][1], results["reference"][1], dtype, "x0")
    conv = torch.nn.Conv2d(3, 3, 3, padding=1).cuda().to(dtype)
    losses = {}
    for backend in ("reference", "triton"):
        (leaf,) = _leaves(x0)
        loss = _seeded(genfast.diffusion_loss, backend, lambda x_t, t: conv(x_t), leaf, schedule, t=t)
        losses[backend] = (loss, *torch.autograd.grad(loss, [leaf, *conv.parameters()]))
    # an fp32 loss of bf16 x_t and ε̂: where the two noises straddle a rounding boundary of x_t, x_t differs by one
    # ulp of its dtype, so the loss agrees to the tolerance of that dtype
    assert_close(losses["triton"][0], losses["reference"][0], dtype, noise_scale=4.0)
    for name, got, want in zip(("x0", "weight", "bias"), losses["triton"][1:], losses["reference"][1:]):
        assert_close_rel_norm(got, want, dtype, name)


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("step", ["ddpm", "ddim"])
def test_sampler_steps_on_gpu(step, dtype):
    schedule = genfast.NoiseSchedule.linear().cuda()
    x = torch.randn(16, 3, 32, 32, device="cuda", dtype=dtype)
    eps, grad = torch.randn_like(x), torch.randn_like(x)

    def run(e, x_t, generator):
        if step == "ddpm":
            return genfast.ddpm_step(e, 500, x_t, schedule, generator=generator)
        return genfast.ddim_step(e, 500, 480, x_t, schedule, eta=1.0, generator=generator)

    results = {}
    for backend in ("reference", "triton"):
        leaves = _leaves(eps, x)
        out = _seeded(run, backend, *leaves)
        results[backend] = (out, *torch.autograd.grad(out, leaves, grad))
    assert_close(results["triton"][0], results["reference"][0], dtype, noise_scale=1.0)
    for name, got, want in zip(("model_output", "x_t"), results["triton"][1:], results["reference"][1:]):
        _assert_grad(got, want, dtype, name)


def test_gradient_penalty_on_gpu():
    critic = torch.nn.Sequential(torch.nn.Conv2d(3, 8, 4, 2, 1), torch.nn.LeakyReLU(0.2), torch.nn.Flatten(),
                                 torch.nn.Linear(8 * 16 * 16, 1)).cuda()
    real = torch.randn(16, 3, 32, 32, device="cuda")
    fake = torch.randn(16, 3, 32, 32, device="cuda")
    alpha = torch.rand(16, device="cuda")
    # piecewise linear: ∇_x critic depends on the weights only (the biases get no or zero gradients)
    params = [critic[0].weight, critic[3].weight]
    results = {}
    for backend in ("reference", "triton"):
        with genfast.use_backend(backend):
            penalty = genfast.gradient_penalty(critic, real, fake, alpha=alpha)
            results[backend] = (penalty, *torch.autograd.grad(penalty, params))
    assert_close(results["triton"][0], results["reference"][0])
    for got, want in zip(results["triton"][1:], results["reference"][1:]):
        _assert_grad(got, want, torch.float32)


def test_past_two_to_the_31_elements():
    """Offsets past 2**31 elements: KL of a (3, 2**30 + 5) fp16 tensor, checked row by row in float64."""
    n = 2**30 + 5
    mu = torch.empty(3, n, device="cuda", dtype=torch.float16).normal_(0, 0.1)
    logvar = torch.empty_like(mu).normal_(0, 0.1)
    with genfast.use_backend("triton"):
        kl = genfast.gaussian_kl(mu, logvar)
        x_t = genfast.q_sample(mu, torch.tensor([0, 10, 999], device="cuda"), genfast.NoiseSchedule.linear().cuda(),
                               noise=logvar)
    for b in range(3):
        m, lv = mu[b].double(), logvar[b].double()
        want = 0.5 * (m * m + lv.exp() - 1 - lv).sum()
        torch.testing.assert_close(kl[b].double(), want, rtol=1e-4, atol=1e-2)
    # the last elements of the last sample lie past 2**31 in memory
    schedule = genfast.NoiseSchedule.linear().cuda()
    a = schedule.alphas_cumprod[999]
    want_tail = (a.sqrt() * mu[2, -1000:].double() + (1 - a).sqrt() * logvar[2, -1000:].double())
    torch.testing.assert_close(x_t[2, -1000:].double(), want_tail, rtol=2e-3, atol=2e-3)


# ---- every op: batches past the grid limit, two runs, torch.compile ---------------------------------------------

OP_MODULES = {"reparameterize_kl": "reparameterize", "q_sample": "diffusion", "diffusion_loss": "diffusion",
              "ddpm_step": "diffusion", "ddim_step": "diffusion", "ddim_step thresholded": "diffusion",
              "gradient_penalty": "gradient_penalty",
              "group_norm_silu": "group_norm_silu"}
# (backend, op) for every kernel backend with CUDA kernels for the op
KERNEL_OPS = [(backend, name) for name in OP_MODULES for backend in _gpu_backends(OP_MODULES[name])]


def _critic(w):
    return lambda h: 0.5 * (w * h.square()).flatten(1).sum(1)


def _op_calls(batch: int) -> dict:
    """name -> (inputs, fn(*leaves, generator) -> outputs) for every op on ``batch`` samples of shape (32, 2)."""
    schedule = genfast.NoiseSchedule.linear().cuda()
    x, y = (torch.randn(batch, 32, 2, device="cuda") for _ in range(2))
    t = torch.randint(20, 1000, (batch,), device="cuda")
    w = torch.randn(32, 2, device="cuda")
    return {
        "reparameterize_kl": ((x, y), lambda m, v, g: genfast.reparameterize_kl(m, 0.3 * v, generator=g)),
        "q_sample": ((x,), lambda a, g: (genfast.q_sample(a, t, schedule, generator=g),)),
        "diffusion_loss": ((x, y), lambda a, b, g: (genfast.diffusion_loss(lambda x_t, _: a * x_t, b, schedule, t=t,
                                                                           generator=g),)),
        "ddpm_step": ((x, y), lambda e, a, g: (genfast.ddpm_step(e, t, a, schedule, generator=g),)),
        "ddim_step": ((x, y), lambda e, a, g: (genfast.ddim_step(e, t, t - 20, a, schedule, 1.0, generator=g),)),
        "ddim_step thresholded": ((x, y), lambda e, a, g: (genfast.ddim_step(
            e, t, t - 20, a, schedule, 1.0, prediction_type="v_prediction", thresholding=True, sample_max_value=1.5,
            generator=g),)),
        "gradient_penalty": ((x, y), lambda a, b, g: (genfast.gradient_penalty(_critic(w), a, b, generator=g),)),
        "group_norm_silu": ((x, y[:, :, 0]), lambda a, e, g: (genfast.group_norm_silu(a, 8, add=e),)),
    }


def _outputs_and_grads(inputs, fn, generator=None):
    """fn's outputs and the gradients w.r.t. every input of fixed random upstream gradients."""
    leaves = _leaves(*inputs)
    outputs = fn(*leaves, generator)
    upstream = torch.Generator(device="cuda").manual_seed(0)
    grads = [torch.randn(o.shape, device="cuda", dtype=o.dtype, generator=upstream) for o in outputs]
    return (*outputs, *torch.autograd.grad(outputs, leaves, grads))


def _assert_all_close(got, want):
    for i, (a, b) in enumerate(zip(got, want, strict=True)):
        _assert_grad(a, b, a.dtype, f"result {i}")


@pytest.mark.parametrize("backend, name", KERNEL_OPS)
def test_batches_past_the_grid_limit(backend, name):
    """70,000 samples: past CUDA's limit of 65,535 on grid axes 1 and 2 (the per-sample launchers slice the
    batch), forward and backward against the reference."""
    inputs, fn = _op_calls(70_000)[name]
    got, want = (_seeded(_outputs_and_grads, b, inputs, fn) for b in (backend, "reference"))
    _assert_all_close(got, want)


@pytest.mark.parametrize("backend, name", KERNEL_OPS)
def test_two_runs_are_bitwise_equal(backend, name):
    """No float atomics: the same inputs and seed give the same bits, forward and backward (the reductions are in
    a fixed order)."""
    inputs, fn = _op_calls(4096)[name]
    first, second = (_seeded(_outputs_and_grads, backend, inputs, fn) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("backend", _gpu_backends("group_norm_silu"))
@pytest.mark.parametrize("layout", [torch.contiguous_format, torch.channels_last])
def test_two_runs_of_the_group_norm_split_path_are_bitwise_equal(backend, layout):
    x = torch.randn(2, 512, 128, 128, device="cuda", dtype=torch.bfloat16).to(memory_format=layout)
    weight, bias = torch.randn(512, device="cuda"), torch.randn(512, device="cuda")
    fn = lambda a, w, b, g: (genfast.group_norm_silu(a, 32, w, b),)  # noqa: E731
    first, second = (_seeded(_outputs_and_grads, backend, (x, weight, bias), fn) for _ in range(2))
    assert all(torch.equal(a, b) for a, b in zip(first, second, strict=True))


@pytest.mark.parametrize("backend, name", KERNEL_OPS)
def test_torch_compile_fullgraph_of_every_op_on_gpu(backend, name):
    """Each op compiled with fullgraph=True on ``backend`` — its forward, and its compiled backward run by
    autograd.grad — against eager on the reference, from the same seed (fallback_random: the compiled
    torch.randint draws eager's seeds). The gradient penalty differentiates the critic inside the op and
    AOTAutograd has no double backward, so its gradients are taken inside the compiled function (dynamo traces
    autograd.grad with trace_autograd_ops)."""
    inputs, fn = _op_calls(64)[name]

    def run(compiled: bool):
        if name != "gradient_penalty":
            return _outputs_and_grads(inputs, torch.compile(fn, fullgraph=True) if compiled else fn)

        def step(real, fake):
            (penalty,) = fn(real, fake, None)
            return (penalty.detach(), *torch.autograd.grad(penalty, (real, fake)))

        return (torch.compile(step, fullgraph=True) if compiled else step)(*_leaves(*inputs))

    results = []
    for compiled, backend_name in ((True, backend), (False, "reference")):
        torch.manual_seed(1)
        with genfast.use_backend(backend_name), torch._dynamo.config.patch(trace_autograd_ops=True), \
                torch._inductor.config.patch(fallback_random=True):
            results.append(run(compiled))
    _assert_all_close(*results)


# ---- CUDA graphs -----------------------------------------------------------------------------------------------


@pytest.mark.parametrize("own_generator", [False, True])
def test_a_captured_sampler_step_replays_the_eager_noise(own_generator):
    """ddpm_step and a stochastic ddim_step captured in a CUDA graph: no sync refuses the capture, and each replay
    draws the seed the next eager call would (torch's CUDA generators are graph-safe), so the outputs are the
    eager ones, bit for bit. A generator of one's own is registered with the graph."""
    schedule = genfast.NoiseSchedule.linear().cuda()
    x, eps = torch.randn(16, 3, 32, 32, device="cuda"), torch.randn(16, 3, 32, 32, device="cuda")
    t = torch.randint(20, 1000, (16,), device="cuda")
    generator = torch.Generator(device="cuda") if own_generator else None

    def reseed():
        (generator or torch.cuda).manual_seed(7)

    def step():
        return (genfast.ddpm_step(eps, t, x, schedule, generator=generator),
                genfast.ddim_step(eps, t, t - 20, x, schedule, 1.0, generator=generator))

    with genfast.use_backend("triton"):
        reseed()
        eager = [step() for _ in range(3)]
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            step()  # warm-up: compiles the kernels outside the capture
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        if generator is not None:
            graph.register_generator_state(generator)
        with torch.cuda.graph(graph):
            static = step()
    reseed()
    for want in eager:
        graph.replay()
        assert all(torch.equal(got, w) for got, w in zip(static, want, strict=True))


@pytest.mark.parametrize("sampler, steps, eta", [("ddpm", None, 0.0), ("ddim", 10, 0.0), ("ddim", 10, 1.0)])
def test_cuda_graph_sampling_matches_the_plain_loop(sampler, steps, eta):
    """DDPM.sample(cuda_graph=True) (warm-up steps, one capture, replays) against the plain loop from the same
    generator; convolutions may pick other cuDNN / cuBLAS kernels on the capture stream, so to a tolerance."""
    unet = UNet(image_size=16, base_channels=32, channel_mult=(1, 2), num_res_blocks=1, attention_resolutions=(8,),
                num_groups=8)
    torch.nn.init.normal_(unet.conv_out.weight, std=0.05)  # else ε̂ = 0 and the U-Net would not matter
    model = DDPM(unet=unet, schedule=genfast.NoiseSchedule.linear(20)).cuda()
    for own_generator in (False, True):
        images = []
        for cuda_graph in (False, True):
            generator = torch.Generator(device="cuda").manual_seed(3) if own_generator else None
            torch.manual_seed(3)
            images.append(model.sample(4, sampler=sampler, steps=steps, eta=eta, generator=generator,
                                       cuda_graph=cuda_graph))
        torch.testing.assert_close(images[1], images[0], rtol=1e-4, atol=1e-4)
