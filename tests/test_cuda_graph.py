"""CUDA-graph sampling, checked on the CPU: ``DDPM.sample(cuda_graph=True)`` runs the static-buffer step that CUDA
captures (uncaptured here) and gives the plain loop's images and generator state; that step, and the diffusers
schedulers' ``step`` with a tensor timestep, read no tensor back (a read would be a device sync, which a capture
refuses). tests/test_gpu.py captures and replays on a GPU."""
import pytest
import torch

import genfast
from backends import skip_unless_usable
from genfast.models import DDPM, UNet, ddpm as ddpm_module
from test_host_path import no_reads  # every Python read of a tensor refused

SAMPLERS = [("ddpm", None, 0.0), ("ddim", 4, 0.0), ("ddim", 5, 1.0)]


def _model(num_steps=10):
    unet = UNet(image_size=16, in_channels=3, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                attention_resolutions=(8,), num_groups=4)
    torch.nn.init.normal_(unet.conv_out.weight, std=0.1)  # else ε̂ = 0 and the U-Net would not matter
    return DDPM(unet=unet, schedule=genfast.NoiseSchedule.linear(num_steps))


@pytest.mark.parametrize("sampler, steps, eta", SAMPLERS)
def test_graph_sampling_gives_the_plain_loops_images_and_generator_state(sampler, steps, eta):
    """On the default backend (the C++ kernels where built): the static-buffer loop is backend-independent."""
    model = _model()
    kwargs = dict(sampler=sampler, steps=steps, eta=eta)
    results = []
    for cuda_graph in (False, True):
        generator = torch.Generator().manual_seed(3)
        images = model.sample(3, generator=generator, cuda_graph=cuda_graph, **kwargs)
        results.append((images, generator.get_state()))
    (plain, plain_state), (graphed, graphed_state) = results
    assert torch.equal(graphed, plain)
    assert torch.equal(graphed_state, plain_state)  # the same seeds drawn: none at the DDPM step t = 0
    # torch's default generator, as with generator=None on CUDA
    torch.manual_seed(5)
    plain = model.sample(2, **kwargs)
    torch.manual_seed(5)
    assert torch.equal(model.sample(2, cuda_graph=True, **kwargs), plain)


def test_graph_sampling_of_a_single_step_and_bad_flags():
    model = _model(num_steps=1)
    generator = torch.Generator().manual_seed(0)
    want = model.sample(2, generator=generator)
    assert torch.equal(model.sample(2, generator=generator.manual_seed(0), cuda_graph=True), want)
    with pytest.raises(TypeError, match="cuda_graph must be a bool"):
        model.sample(2, cuda_graph=1)


@pytest.fixture(params=["reference", "cpp"])
def cpu_backend(request):
    """The backends whose CPU code is not the Triton interpreter (which reads tensors by design)."""
    skip_unless_usable(request.param)
    with genfast.use_backend(request.param):
        yield request.param


@pytest.mark.parametrize("sampler, steps, eta", SAMPLERS)
def test_the_graphed_step_reads_nothing_back(monkeypatch, cpu_backend, sampler, steps, eta):
    """What CUDA captures: the U-Net and the fused step on the static buffers, ``WARMUP_STEPS`` of them and the
    captured one (all of them on the CPU), with every Python read of a tensor refused."""
    run_steps = ddpm_module._run_steps

    def guarded(*args):
        with no_reads():
            run_steps(*args)

    monkeypatch.setattr(ddpm_module, "_run_steps", guarded)
    images = _model().sample(2, sampler=sampler, steps=steps, eta=eta, cuda_graph=True)
    assert torch.isfinite(images).all()


# ---- the diffusers schedulers ----------------------------------------------------------------------------------


def _schedulers():
    pytest.importorskip("diffusers")
    from genfast.integrations.diffusers import GenfastDDIMScheduler, GenfastDDPMScheduler

    ddim = GenfastDDIMScheduler(num_train_timesteps=1000, set_alpha_to_one=False, prediction_type="v_prediction",
                                thresholding=True, sample_max_value=1.5)
    ddim.set_timesteps(50)
    return GenfastDDPMScheduler(num_train_timesteps=1000), ddim


@pytest.mark.parametrize("eta", [0.0, 1.0])
def test_scheduler_steps_with_a_tensor_timestep_read_nothing_back(eta):
    """A one-element tensor timestep stays on the device (so unet + step can be captured) and steps as its int."""
    ddpm, ddim = _schedulers()
    x, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    for t in (999, 20, 0):
        steps = [(ddim, dict(eta=eta))] + ([(ddpm, {})] if eta == 0 else [])
        for scheduler, kwargs in steps:
            want = scheduler.step(eps, t, x, generator=torch.Generator().manual_seed(t), **kwargs)
            timestep = torch.tensor(t)
            with no_reads():
                got = scheduler.step(eps, timestep, x, generator=torch.Generator().manual_seed(t), **kwargs)
            torch.testing.assert_close(got.prev_sample, want.prev_sample)
            torch.testing.assert_close(got.pred_original_sample, want.pred_original_sample)


def test_ddpm_scheduler_with_fewer_steps_reads_no_tensor_timestep_back():
    """With set_timesteps(10) a DDPM step goes t → the next of the timesteps: a tensor timestep finds it in a device
    table, read nothing back, and steps as its int (which asks diffusers' previous_timestep)."""
    ours, _ = _schedulers()
    ours.set_timesteps(10)
    x, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    for t in ours.timesteps[[0, 3, -1]]:
        want = ours.step(eps, int(t), x, generator=torch.Generator().manual_seed(0)).prev_sample
        with no_reads():
            got = ours.step(eps, t, x, generator=torch.Generator().manual_seed(0)).prev_sample
        torch.testing.assert_close(got, want)
