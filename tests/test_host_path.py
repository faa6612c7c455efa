"""The host side of every op: no device→host read anywhere (forward, backward, reference included, on the direct
eager path and through the registered ops), the reference noise computed from the seed tensor (bitwise the stream
of before), tensor timesteps checked without a read (also under torch.compile), and the device guard (a CPU test of
its logic, and cuda:1 without set_device on two GPUs)."""
import argparse
import contextlib
import json

import pytest
import torch

import genfast
from backends import skip_unless_usable
from genfast import _backend
from genfast.bench import overhead
from genfast.models import UNet
from genfast.reference.random import MASK32, _box_muller, philox4x32, philox_normal

CPU_BACKENDS = ("reference", "cpp", "torch")  # "triton" on the CPU is the interpreter: it reads tensors by design
READS = ("item", "tolist", "__bool__", "__int__", "__float__", "__index__", "cpu", "numpy")
SCHEDULE = genfast.NoiseSchedule.linear(50)


@contextlib.contextmanager
def no_reads():
    """Every Tensor method that reads values back to the host raises inside the block."""
    saved = {name: getattr(torch.Tensor, name) for name in READS}

    def refuse(name):
        def read(*args, **kwargs):
            raise AssertionError(f"Tensor.{name} read a value back to the host")
        return read

    for name in READS:
        setattr(torch.Tensor, name, refuse(name))
    try:
        yield
    finally:
        for name, method in saved.items():
            setattr(torch.Tensor, name, method)


def randn(*shape, grad=False):
    return torch.randn(*shape).requires_grad_(grad)


def every_op():
    """(name, thunk) for every public op: each thunk runs the op forward and backward (where it has one)."""
    x, w, b, emb = randn(2, 4, 3, 3, grad=True), randn(4, grad=True), randn(4, grad=True), randn(2, 4, grad=True)
    mu, logvar = randn(3, 5, grad=True), randn(3, 5, grad=True)
    x0, eps = randn(2, 3, 4, grad=True), randn(2, 3, 4, grad=True)
    t, t_prev = torch.tensor([7, 30]), torch.tensor([2, 10])
    scale = torch.nn.Parameter(torch.tensor(0.5))
    norm = genfast.nn.GroupNormSiLU(2, 4)

    def backward(*outputs):
        torch.autograd.backward([o.sum() for o in outputs])

    return [
        ("group_norm_silu", lambda: backward(genfast.group_norm_silu(x, 2, w, b, add=emb))),
        ("group_norm_silu scale_shift", lambda: backward(genfast.group_norm_silu(x, 2, scale=emb, shift=emb))),
        ("GroupNormSiLU", lambda: backward(norm(x))),
        ("reparameterize_kl", lambda: backward(*genfast.reparameterize_kl(mu, logvar))),
        ("reparameterize", lambda: backward(genfast.reparameterize(mu, logvar))),
        ("gaussian_kl", lambda: backward(genfast.gaussian_kl(mu, logvar))),
        ("q_sample tensor t", lambda: backward(genfast.q_sample(x0, t, SCHEDULE))),
        ("q_sample int t", lambda: backward(genfast.q_sample(x0, 12, SCHEDULE))),
        ("diffusion_loss", lambda: backward(genfast.diffusion_loss(lambda x_t, t: scale * x_t, x0, SCHEDULE))),
        ("ddpm_step tensor t", lambda: backward(genfast.ddpm_step(eps, t, x0, SCHEDULE))),
        ("ddpm_step int t", lambda: backward(genfast.ddpm_step(eps, 0, x0, SCHEDULE))),
        ("ddim_step", lambda: backward(genfast.ddim_step(eps, t, t_prev, x0, SCHEDULE))),
        ("ddim_step eta", lambda: backward(genfast.ddim_step(eps, 30, -1, x0, SCHEDULE, eta=0.5))),
        ("ddim_step eta tensor t", lambda: backward(genfast.ddim_step(eps, t, t_prev, x0, SCHEDULE, eta=1.0))),
        ("ddpm_step thresholded, t_prev", lambda: backward(genfast.ddpm_step(
            eps, t, x0, SCHEDULE, t_prev=t_prev - 1, prediction_type="v_prediction", thresholding=True,
            sample_max_value=1.5))),
        ("ddim_step unclipped", lambda: backward(genfast.ddim_step(eps, t, t_prev, x0, SCHEDULE, clip_sample=False))),
        ("diffusion_loss v_prediction", lambda: backward(genfast.diffusion_loss(
            lambda x_t, t: scale * x_t, x0, SCHEDULE, prediction_type="v_prediction"))),
        ("gradient_penalty", lambda: backward(genfast.gradient_penalty(
            lambda v: (scale * v.square()).flatten(1).sum(1), x0, eps.detach()))),
    ]


@pytest.fixture(params=["direct", "registered"])
def path(request, monkeypatch):
    """The public functions' direct eager call, or the registered ops (what torch.compile and the modes see)."""
    if request.param == "registered":
        monkeypatch.setattr(_backend, "_traced", lambda args: True)
    return request.param


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_no_op_reads_a_value_back(name, path):
    skip_unless_usable(name)
    cases = every_op()
    with genfast.use_backend(name):
        for _, run in cases:
            run()  # first calls (loading the extension and the modules) outside the block
        for case, run in cases:
            with no_reads():
                try:
                    run()
                except AssertionError as exc:
                    raise AssertionError(f"{case} on {name!r} ({path}): {exc}") from None


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_a_ddpm_and_a_ddim_sampling_step_of_the_unet_read_nothing_back(name):
    skip_unless_usable(name)
    unet = UNet(image_size=8, in_channels=1, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                attention_resolutions=(4,), num_groups=4).eval()
    x = torch.randn(2, 1, 8, 8)
    with genfast.use_backend(name), torch.no_grad():
        unet(x, torch.full((2,), 3))  # first call outside the block
        with no_reads():
            eps_hat = unet(x, torch.full((2,), 40, dtype=torch.long))
            x = genfast.ddpm_step(eps_hat, 40, x, SCHEDULE)
            eps_hat = unet(x, torch.full((2,), 39, dtype=torch.long))
            x = genfast.ddim_step(eps_hat, 39, 19, x, SCHEDULE, eta=0.5)
    assert torch.isfinite(x).all()


def test_the_refusal_bites():
    """Reading a timestep range back, as the ops did before, raises inside the block."""
    with no_reads(), pytest.raises(AssertionError, match="read a value back"):
        int(torch.aminmax(torch.tensor([1, 2]))[0])


def _old_philox_normal(seed, batch, sample_numel):
    """The reference noise as computed before (the seed read back to Python ints): the stream to keep."""
    key, offset = (int(v) & 0xFFFFFFFFFFFFFFFF for v in seed.tolist())
    groups = (sample_numel + 3) // 4
    c0 = torch.arange(groups, dtype=torch.int64).expand(batch, groups)
    c1 = torch.arange(batch, dtype=torch.int64)[:, None].expand(batch, groups)
    c2, c3 = torch.full_like(c0, offset & MASK32), torch.full_like(c0, offset >> 32)
    x0, x1, x2, x3 = philox4x32(c0, c1, c2, c3, key & MASK32, key >> 32)
    n0, n1 = _box_muller(x0, x1)
    n2, n3 = _box_muller(x2, x3)
    return torch.stack((n0, n1, n2, n3), dim=-1).reshape(batch, groups * 4)[:, :sample_numel]


@pytest.mark.parametrize("seed", [[0, 0], [1, 2], [0x7EDCBA9876543210, -0x123456789ABCDEF1], [-1, -(2**63)],
                                  [2**32 + 5, 2**40 - 3]])
def test_reference_noise_is_bitwise_the_stream_of_before(seed):
    seed = torch.tensor(seed, dtype=torch.int64)
    assert torch.equal(philox_normal(seed, 3, 37), _old_philox_normal(seed, 3, 37))


@pytest.mark.parametrize("name", CPU_BACKENDS)
def test_tensor_timesteps_out_of_range_name_the_argument_and_the_range(name):
    skip_unless_usable(name)
    x = torch.randn(2, 3)
    with genfast.use_backend(name):
        with pytest.raises(ValueError, match=r"^t must be in \[0, 50\) for every sample$"):
            genfast.q_sample(x, torch.tensor([3, -1]), SCHEDULE)
        with pytest.raises(ValueError, match=r"^t must be in \[0, 50\) for every sample$"):
            genfast.ddpm_step(x, torch.tensor([50, 1]), x, SCHEDULE)
        with pytest.raises(ValueError, match=r"^t_prev must be < 50 for every sample$"):
            genfast.ddim_step(x, torch.tensor([3, 4]), torch.tensor([-1, 50]), x, SCHEDULE)
        with pytest.raises(ValueError, match=r"^t_prev must be <= t for every sample when eta > 0"):
            genfast.ddim_step(x, torch.tensor([3, 4]), torch.tensor([2, 5]), x, SCHEDULE, eta=0.5)


def test_tensor_timestep_checks_compile_without_a_graph_break():
    """torch.compile(fullgraph=True) keeps the asynchronous check: in range it runs, out of range it raises."""
    x, t = torch.randn(2, 3), torch.tensor([3, 4])
    step = torch.compile(lambda x, t: genfast.ddpm_step(x, t, x, SCHEDULE, x), fullgraph=True, backend="aot_eager")
    with genfast.use_backend("reference"):
        torch.testing.assert_close(step(x, t), genfast.ddpm_step(x, t, x, SCHEDULE, x))
        with pytest.raises(RuntimeError, match=r"t must be in \[0, 50\)"):
            step(x, torch.tensor([3, 50]))


# ---- the device guard --------------------------------------------------------------------------------------------

class _OnCuda(torch.Tensor):
    """A CPU tensor that says it is on cuda:<index>: the guard reads only ``is_cuda`` and ``get_device()``."""

    is_cuda = True
    index = 1

    def get_device(self):
        return self.index


@pytest.fixture
def fake_cuda(monkeypatch):
    """torch.cuda's current device as a plain variable (0), and torch.cuda.device setting it."""
    state = dict(current=0, entered=[])

    @contextlib.contextmanager
    def device(index):
        state["entered"].append(index)
        previous, state["current"] = state["current"], index
        try:
            yield
        finally:
            state["current"] = previous

    monkeypatch.setattr(torch.cuda, "current_device", lambda: state["current"])
    monkeypatch.setattr(torch.cuda, "device", device)
    return state


def test_the_guard_enters_the_tensors_device_only_when_it_is_not_the_current_one(fake_cuda):
    seen = []

    def kernel(*args):
        seen.append(torch.cuda.current_device())

    on_1 = torch.Tensor._make_subclass(_OnCuda, torch.zeros(2))
    _backend._launch(kernel, (None, on_1, 3))  # the first tensor decides, whatever comes before it
    assert seen == [1] and fake_cuda["entered"] == [1] and fake_cuda["current"] == 0
    fake_cuda["current"] = 1
    _backend._launch(kernel, (on_1,))
    assert seen == [1, 1] and fake_cuda["entered"] == [1]  # already current: nothing entered
    _backend._launch(kernel, (torch.zeros(2),))  # a CPU tensor never asks torch.cuda
    assert fake_cuda["entered"] == [1]


@pytest.mark.parametrize("name", ["reference", "cpp"])
def test_every_kernel_call_goes_through_the_guard(name, path, monkeypatch):
    skip_unless_usable(name)
    calls = []
    launch = _backend._launch
    monkeypatch.setattr(_backend, "_launch", lambda fn, args: calls.append(fn) or launch(fn, args))
    with genfast.use_backend(name):
        for case, run in every_op():
            before = len(calls)
            run()
            # a C++ autograd node (cpp_*_autograd, cpp only) runs its backward on autograd's thread for the tensors'
            # device: its one launch covers both
            graphed = [getattr(fn, "__name__", "").endswith("_autograd") for fn in calls[before:]]
            assert len(graphed) >= 2 or (name == "cpp" and graphed == [True]), f"{case}: a forward and a backward launch"


@pytest.mark.gpu
@pytest.mark.skipif(torch.cuda.device_count() < 2, reason="needs two CUDA devices")
@pytest.mark.parametrize("name", ["triton", "cpp"])
def test_every_op_runs_on_the_second_gpu_without_set_device(name):
    skip_unless_usable(name, "cuda")
    assert torch.cuda.current_device() == 0
    device = torch.device("cuda", 1)
    x, mu = torch.randn(2, 4, 3, 3, device=device), torch.randn(3, 5, device=device)
    schedule = genfast.NoiseSchedule.linear(50).to(device)  # .to moves a module in place: not SCHEDULE
    t = torch.tensor([7, 30], device=device)
    calls = {"group_norm_silu": lambda: genfast.group_norm_silu(x, 2)}
    if _backend.why_not(name, "cuda", op="diffusion") is None:
        calls.update(
            reparameterize_kl=lambda: genfast.reparameterize_kl(mu, mu)[0],
            q_sample=lambda: genfast.q_sample(x, t, schedule),
            ddpm_step=lambda: genfast.ddpm_step(x, t, x, schedule),
            ddim_step=lambda: genfast.ddim_step(x, t, t - 2, x, schedule, eta=0.5),
            ddim_step_thresholded=lambda: genfast.ddim_step(x, t, t - 2, x, schedule, thresholding=True),
            diffusion_loss=lambda: genfast.diffusion_loss(lambda x_t, t: 0.5 * x_t, x, schedule),
            gradient_penalty=lambda: genfast.gradient_penalty(lambda v: v.square().flatten(1).sum(1), x, x + 1),
        )
    for op, call in calls.items():
        torch.manual_seed(0)
        with genfast.use_backend(name):
            got = call()
        torch.manual_seed(0)
        with genfast.use_backend("reference"):
            want = call()
        torch.cuda.synchronize(device)
        assert got.device == device, op
        torch.testing.assert_close(got, want, atol=1e-4, rtol=1e-4, msg=op)


# ---- genfast bench --overhead --------------------------------------------------------------------------------

def test_the_overhead_bench_writes_its_table(tmp_path, monkeypatch):
    """One case through the interleaved timing to the JSON, the table and the log (numbers not checked)."""
    monkeypatch.setattr(overhead, "CASES", (("q_sample", (2, 3, 4, 4), "-"),))
    args = argparse.Namespace(out=tmp_path, quick=True, threads=1, device="cpu", tag="t", rounds=2,
                              command="genfast bench --overhead")
    threads = torch.get_num_threads()
    try:
        assert overhead.run(args) == 0
    finally:
        torch.set_num_threads(threads)
    (result,) = tmp_path.glob("cpu-*-overhead-quick-t.json")
    rows = json.loads(result.read_text())["rows"]
    assert {(r["mode"], r["impl"]) for r in rows} >= {("no grad", "eager"), ("grad", "genfast-reference"),
                                                      ("grad", "genfast-default")}
    assert all(r["blocks"] == 2 and r["us_per_call"] > 0 for r in rows)
    table = result.with_suffix(".md").read_text()
    assert "| q_sample 2x3x4x4 | grad |" in table and "of eager" in table
    assert result.with_suffix(".log").read_text().count("\n") > 5
