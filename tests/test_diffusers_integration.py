"""genfast.integrations.diffusers on small randomly initialised diffusers models (no weights downloaded): patched
and unpatched models give the same outputs and gradients, revert restores them exactly, the schedulers match
diffusers' results, and the module explains a missing diffusers."""
import importlib
import itertools
import sys

import pytest
import torch
from torch import nn

import genfast
from genfast._rng import draw_seed
from genfast.reference.random import noise_like

from tolerances import TOLERANCES, assert_all_grads_close, assert_close, assert_close_rel_norm

pytest.importorskip("diffusers")

from diffusers import (  # noqa: E402
    AutoencoderKL, DDIMScheduler, DDPMScheduler, UNet2DConditionModel, UNet2DModel,
)
from diffusers.models.resnet import ResnetBlock2D  # noqa: E402

from genfast.integrations.diffusers import (  # noqa: E402
    FusedDiagonalGaussianDistribution, FusedResnetBlock2D, GenfastDDIMScheduler, GenfastDDPMScheduler,
    apply_genfast, revert_genfast,
)


def _unet(time_embedding_norm="default"):
    return UNet2DModel(sample_size=8, in_channels=3, out_channels=3, block_out_channels=(8, 16), norm_num_groups=4,
                       layers_per_block=1, attention_head_dim=4, resnet_time_scale_shift=time_embedding_norm,
                       down_block_types=("DownBlock2D", "AttnDownBlock2D"),
                       up_block_types=("AttnUpBlock2D", "UpBlock2D"))


def _conditional_unet():
    return UNet2DConditionModel(sample_size=8, in_channels=4, out_channels=4, block_out_channels=(8, 16),
                                norm_num_groups=4, layers_per_block=1, cross_attention_dim=8, attention_head_dim=4,
                                down_block_types=("CrossAttnDownBlock2D", "DownBlock2D"),
                                up_block_types=("UpBlock2D", "CrossAttnUpBlock2D"))


def _vae():
    return AutoencoderKL(in_channels=3, out_channels=3, block_out_channels=(8, 16), latent_channels=4,
                         norm_num_groups=4, layers_per_block=1, sample_size=8,
                         down_block_types=("DownEncoderBlock2D", "DownEncoderBlock2D"),
                         up_block_types=("UpDecoderBlock2D", "UpDecoderBlock2D"))


def _outputs_and_grads(model, run, inputs):
    """run(model, *inputs) and the gradients of the inputs and every parameter for a random (fixed-seed) upstream
    gradient."""
    inputs = [x.clone().requires_grad_() if x.is_floating_point() else x for x in inputs]
    out = run(model, *inputs)
    leaves = [x for x in inputs if x.requires_grad] + list(model.parameters())
    grad = torch.randn(out.shape, generator=torch.Generator().manual_seed(0))
    grads = torch.autograd.grad(out, leaves, grad, allow_unused=True)
    return out.detach(), grads


def _check_patched_matches(model, run, inputs, tol=None):
    """apply_genfast leaves outputs, gradients and state_dict as they were; revert_genfast restores every module."""
    modules = dict(model.named_modules())
    classes = {name: type(m) for name, m in modules.items()}
    state = {k: v.clone() for k, v in model.state_dict().items()}
    want_out, want_grads = _outputs_and_grads(model, run, inputs)

    assert apply_genfast(model) is model
    assert apply_genfast(model) is model  # twice: a no-op
    after = model.state_dict()
    assert list(after) == list(state) and all(torch.equal(after[k], v) for k, v in state.items())
    out, grads = _outputs_and_grads(model, run, inputs)
    torch.testing.assert_close(out, want_out, **(tol or TOLERANCES[torch.float32]))
    for g, w in zip(grads, want_grads):
        if w is None:
            assert g is None
        else:
            torch.testing.assert_close(g, w, **(tol or TOLERANCES[torch.float32]))
    # all gradients together by relative norm (some are zero in exact arithmetic, fp32 noise here)
    assert_all_grads_close(grads, want_grads, torch.float32)
    patched = model

    assert revert_genfast(model) is model
    assert all(modules[name] is m for name, m in model.named_modules()) and len(modules) == len(classes)
    assert all(type(m) is classes[name] for name, m in model.named_modules())
    return patched


def _unet_run(model, x, t):
    return model(x, t).sample


@pytest.mark.parametrize("time_embedding_norm", ["default", "scale_shift"])
def test_unet2d_patched_matches(time_embedding_norm):
    model = _unet(time_embedding_norm)
    x, t = torch.randn(2, 3, 8, 8), torch.tensor([3, 700])
    resnets = [m for m in model.modules() if isinstance(m, ResnetBlock2D)]
    apply_genfast(model)
    assert all(type(m) is FusedResnetBlock2D for m in resnets) and len(resnets) == 8
    assert isinstance(model.conv_norm_out, genfast.nn.GroupNormSiLU) and isinstance(model.conv_act, nn.Identity)
    # the attention GroupNorms (followed by a projection, not SiLU) stay
    attention_norms = [m.group_norm for m in model.modules() if getattr(m, "group_norm", None) is not None]
    assert attention_norms and all(type(norm) is nn.GroupNorm for norm in attention_norms)
    revert_genfast(model)
    _check_patched_matches(model, _unet_run, [x, t])


# The Triton interpreter is slow: the kernels run on single blocks, with and without a time embedding.
@pytest.mark.parametrize("time_embedding_norm, temb_channels", [("default", 6), ("scale_shift", 6),
                                                                ("default", None)])
def test_resnet_block_patched_matches(backend, time_embedding_norm, temb_channels):
    block = ResnetBlock2D(in_channels=4, out_channels=8, temb_channels=temb_channels, groups=2,
                          time_embedding_norm=time_embedding_norm, output_scale_factor=2.0)
    x = torch.randn(2, 4, 3, 3)
    if temb_channels is None:
        _check_patched_matches(block, lambda m, x: m(x, None), [x])
    else:
        _check_patched_matches(block, lambda m, x, temb: m(x, temb), [x, torch.randn(2, temb_channels)])


def test_unet2d_condition_patched_matches():
    model = _conditional_unet()
    x, t, context = torch.randn(2, 4, 8, 8), torch.tensor([10, 999]), torch.randn(2, 5, 8)
    _check_patched_matches(model, lambda m, x, c: m(x, t, encoder_hidden_states=c).sample, [x, context])


def test_vae_encode_decode_patched_matches():
    model = _vae()
    x = torch.randn(1, 3, 8, 8)
    patched = _check_patched_matches(model, lambda m, x: m.decode(m.encode(x).latent_dist.mode()).sample, [x])
    assert patched is model
    apply_genfast(model)
    assert type(model.encoder.conv_norm_out) is genfast.nn.GroupNormSiLU
    assert type(model.decoder.conv_norm_out) is genfast.nn.GroupNormSiLU
    assert type(model.encoder.mid_block.attentions[0].group_norm) is nn.GroupNorm  # not followed by SiLU
    assert type(model.encode(x).latent_dist) is FusedDiagonalGaussianDistribution
    assert type(model.encode(x, return_dict=False)[0]) is FusedDiagonalGaussianDistribution
    revert_genfast(model)
    assert "encode" not in model.__dict__
    assert type(model.encode(x).latent_dist).__name__ == "DiagonalGaussianDistribution"


def test_vae_posterior_sample_is_the_fused_reparameterization():
    model = apply_genfast(_vae())
    x = torch.randn(2, 3, 8, 8)
    posterior = model.encode(x).latent_dist
    z = posterior.sample(generator=torch.Generator().manual_seed(3))
    # the seed comes from the generator: the same as genfast.reparameterize with that generator
    want = genfast.reparameterize(posterior.mean, posterior.logvar, generator=torch.Generator().manual_seed(3))
    assert torch.equal(z, want)
    eps = noise_like(posterior.mean.contiguous(), draw_seed(x.device, torch.Generator().manual_seed(3)))
    assert_close(z, posterior.mean + posterior.std * eps)
    # torch.manual_seed governs generator=None
    torch.manual_seed(5)
    first = posterior.sample()
    torch.manual_seed(5)
    assert torch.equal(posterior.sample(), first)
    # gradients reach the encoder as through diffusers' μ + σ·ε with the same ε (a random upstream gradient)
    grad_z = torch.randn(z.shape, generator=torch.Generator().manual_seed(4))
    grads = torch.autograd.grad(z, list(model.encoder.parameters()), grad_z)
    posterior = model.encode(x).latent_dist
    unfused = posterior.mean + posterior.std * eps
    want_grads = torch.autograd.grad(unfused, list(model.encoder.parameters()), grad_z)
    for g, w in zip(grads, want_grads):
        torch.testing.assert_close(g, w, atol=1e-4, rtol=1e-4)
    pairs = [(g.reshape(-1), w.reshape(-1)) for g, w in zip(grads, want_grads)]
    # all gradients together by relative norm (some are zero in exact arithmetic, fp32 noise here)
    assert_close_rel_norm(torch.cat([g for g, _ in pairs]), torch.cat([w for _, w in pairs]))


def test_deterministic_posterior_keeps_diffusers_sample():
    model = apply_genfast(_vae())
    params = model.encode(torch.randn(1, 3, 8, 8)).latent_dist.parameters
    posterior = FusedDiagonalGaussianDistribution(params, deterministic=True)
    assert torch.equal(posterior.sample(), posterior.mean)


def test_fused_block_compiles_without_graph_breaks():
    block = ResnetBlock2D(in_channels=8, out_channels=16, temb_channels=12, groups=4)
    x, temb = torch.randn(2, 8, 4, 4), torch.randn(2, 12)
    want = block(x, temb)
    apply_genfast(block)
    assert type(block) is FusedResnetBlock2D
    torch.testing.assert_close(torch.compile(block, fullgraph=True)(x, temb), want, **TOLERANCES[torch.float32])


def test_blocks_the_fused_ops_cannot_express_run_diffusers_forward():
    relu = ResnetBlock2D(in_channels=8, temb_channels=12, groups=4, non_linearity="relu")
    hooked = ResnetBlock2D(in_channels=8, temb_channels=12, groups=4)
    hooked.norm2.register_forward_hook(lambda *args: None)
    apply_genfast(relu)
    apply_genfast(hooked)
    assert type(relu) is ResnetBlock2D and type(hooked) is ResnetBlock2D
    # a temb of batch 1 broadcast over the batch: diffusers' forward runs
    block = ResnetBlock2D(in_channels=8, temb_channels=12, groups=4)
    x, temb = torch.randn(3, 8, 4, 4), torch.randn(1, 12)
    want = block(x, temb)
    apply_genfast(block)
    assert torch.equal(block(x, temb), want)


# ---- schedulers ------------------------------------------------------------------------------------------------

PREDICTIONS = ("epsilon", "v_prediction", "sample")
# diffusers' x̂₀ handlings: its default (clip to ±1), another range, none, dynamic thresholding (s inside (1, 1.5))
HANDLINGS = (dict(), dict(clip_sample_range=1.5), dict(clip_sample=False),
             dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=1.5))


@pytest.fixture
def fused_calls(monkeypatch):
    """The fused steps the schedulers call, by name (diffusers' own step does not call them)."""
    import genfast.integrations.diffusers as integration

    calls = []
    for name in ("ddpm_step", "ddim_step"):
        op = getattr(integration, name)
        monkeypatch.setattr(integration, name, lambda *a, _op=op, _name=name, **k: calls.append(_name) or _op(*a, **k))
    return calls


def _philox_in_place_of_randn(want, theirs, t, x, generator_seed):
    """diffusers' DDPM result with its torch.randn variance noise replaced by genfast's Philox noise of the same
    generator seed."""
    if t == 0:
        return want
    std = theirs._get_variance(t) ** 0.5 if theirs.variance_type != "fixed_small_log" else theirs._get_variance(t)
    z = noise_like(x, draw_seed(x.device, torch.Generator().manual_seed(generator_seed)))
    return want + std * (z - torch.randn(x.shape, generator=torch.Generator().manual_seed(generator_seed)))


@pytest.mark.parametrize("handling", HANDLINGS, ids=("default", "range", "unclipped", "threshold"))
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_ddpm_scheduler_matches_diffusers(backend, prediction_type, handling, fused_calls):
    """Every configuration the fused step covers: prev_sample (with Philox noise in place of torch.randn) and
    pred_original_sample, int and tensor timesteps, all T steps and set_timesteps(10) with two spacings."""
    x, model_output = 1.5 * torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    # diffusers derives the posterior coefficients from float32 ᾱ (see test_diffusion_steps): ~1e-3 at the
    # smallest β
    tol = dict(atol=1e-3, rtol=1e-3)
    for variance_type, spacing in (("fixed_small", None), ("fixed_small_log", "leading"), ("fixed_large", "trailing")):
        config = dict(prediction_type=prediction_type, variance_type=variance_type, **handling)
        theirs = DDPMScheduler(num_train_timesteps=100, timestep_spacing=spacing or "leading", **config)
        ours = GenfastDDPMScheduler.from_config(theirs.config)
        if spacing is not None:
            theirs.set_timesteps(10)
            ours.set_timesteps(10)
        steps = [99, 50, 1, 0] if spacing is None else [int(t) for t in theirs.timesteps[[0, 4, -1]]]
        for t, timestep in itertools.product(steps, ("int", "tensor")):
            want = theirs.step(model_output, t, x, generator=torch.Generator().manual_seed(t))
            out = ours.step(model_output, t if timestep == "int" else torch.tensor(t), x,
                            generator=torch.Generator().manual_seed(t))
            expected = _philox_in_place_of_randn(want.prev_sample, theirs, t, x, t)
            torch.testing.assert_close(out.prev_sample, expected, **tol)
            torch.testing.assert_close(out.pred_original_sample, want.pred_original_sample, **tol)
    assert fused_calls == ["ddpm_step"] * (8 + 6 + 6)  # every step above fused
    ours = GenfastDDPMScheduler(num_train_timesteps=100, prediction_type=prediction_type, **handling)
    prev, x0 = ours.step(model_output, 0, x, return_dict=False)
    assert torch.equal(prev, ours.step(model_output, 0, x).prev_sample) and x0.shape == x.shape


@pytest.mark.parametrize("handling", HANDLINGS, ids=("default", "range", "unclipped", "threshold"))
@pytest.mark.parametrize("prediction_type", PREDICTIONS)
def test_ddim_scheduler_matches_diffusers(backend, prediction_type, handling, fused_calls):
    x, model_output, z = 1.5 * torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    for set_alpha_to_one in (True, False):
        theirs = DDIMScheduler(num_train_timesteps=1000, set_alpha_to_one=set_alpha_to_one,
                               prediction_type=prediction_type, **handling)
        ours = GenfastDDIMScheduler.from_config(theirs.config)
        theirs.set_timesteps(50)
        ours.set_timesteps(50)
        for t, eta, use_clipped in itertools.product((980, 20, 0), (0.0, 1.0), (False, True)):
            want = theirs.step(model_output, t, x, eta=eta, use_clipped_model_output=use_clipped, variance_noise=z)
            out = ours.step(model_output, torch.tensor(t), x, eta=eta, use_clipped_model_output=use_clipped,
                            variance_noise=z)
            torch.testing.assert_close(out.prev_sample, want.prev_sample, atol=1e-4, rtol=1e-4)
            torch.testing.assert_close(out.pred_original_sample, want.pred_original_sample, atol=1e-4, rtol=1e-4)
    assert fused_calls == ["ddim_step"] * 24
    # with a generator, the seed of genfast's in-kernel noise is drawn from it
    out = ours.step(model_output, 500, x, eta=1.0, generator=torch.Generator().manual_seed(1)).prev_sample
    schedule = ours.genfast_schedule(x.device)
    assert torch.equal(out, genfast.ddim_step(model_output, 500, 480, x, schedule, 1.0, prediction_type=prediction_type,
                                              generator=torch.Generator().manual_seed(1),
                                              **{**dict(clip_sample=True), **handling}))


def test_add_noise_matches_diffusers(backend):
    theirs = DDPMScheduler(num_train_timesteps=1000, beta_schedule="squaredcos_cap_v2")
    ours = GenfastDDPMScheduler.from_config(theirs.config)
    x, noise = torch.randn(3, 2, 4, 4), torch.randn(3, 2, 4, 4)
    for t in (torch.tensor([0, 400, 999]), torch.tensor(250), torch.tensor([7], dtype=torch.int32)):
        want = theirs.add_noise(x, noise, t)
        torch.testing.assert_close(ours.add_noise(x, noise, t), want, atol=1e-5, rtol=1e-5)


def test_the_configurations_on_each_side(fused_calls):
    """DDPM: 3 prediction types × 3 x̂₀ handlings (clip, none, thresholding) × 6 variance types = 54 configurations:
    the 27 with variance fixed_small, fixed_small_log or fixed_large run the fused step, the 27 with fixed_large_log,
    learned or learned_range diffusers' own, and return diffusers' results exactly. DDIM: 3 × 3 × eta (0, 1, 1.5) ×
    use_clipped_model_output (2) = 54: the 36 with eta ≤ 1 fused, the 18 with eta = 1.5 diffusers'."""
    x, model_output = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    handlings = (dict(), dict(clip_sample=False), dict(thresholding=True, sample_max_value=1.5))
    sides = {"fused": 0, "diffusers": 0}
    for prediction_type, handling, variance_type in itertools.product(
            PREDICTIONS, handlings, ("fixed_small", "fixed_small_log", "fixed_large", "fixed_large_log", "learned",
                                     "learned_range")):
        theirs = DDPMScheduler(num_train_timesteps=100, prediction_type=prediction_type, variance_type=variance_type,
                               **handling)
        ours = GenfastDDPMScheduler.from_config(theirs.config)
        before = len(fused_calls)
        # a learned variance comes as C more channels of the model output
        output = torch.cat([model_output, model_output]) if variance_type.startswith("learned") else model_output
        output = output.view(2, -1, 4, 4)
        got = ours.step(output, 50, x, generator=torch.Generator().manual_seed(0)).prev_sample
        if len(fused_calls) > before:
            sides["fused"] += 1
        else:
            sides["diffusers"] += 1
            want = theirs.step(output, 50, x, generator=torch.Generator().manual_seed(0)).prev_sample
            torch.testing.assert_close(got, want, rtol=0, atol=0, equal_nan=True)  # fixed_large_log: NaN
    assert sides == {"fused": 27, "diffusers": 27}
    sides = {"fused": 0, "diffusers": 0}
    for prediction_type, handling, eta, use_clipped in itertools.product(PREDICTIONS, handlings, (0.0, 1.0, 1.5),
                                                                         (False, True)):
        theirs = DDIMScheduler(num_train_timesteps=100, prediction_type=prediction_type, **handling)
        ours = GenfastDDIMScheduler.from_config(theirs.config)
        theirs.set_timesteps(10)
        ours.set_timesteps(10)
        before = len(fused_calls)
        noise = torch.randn(x.shape)
        got = ours.step(model_output, 50, x, eta=eta, use_clipped_model_output=use_clipped, variance_noise=noise)
        side = "fused" if len(fused_calls) > before else "diffusers"
        sides[side] += 1
        if side == "diffusers":
            want = theirs.step(model_output, 50, x, eta=eta, use_clipped_model_output=use_clipped,
                               variance_noise=noise)
            assert torch.equal(got.prev_sample, want.prev_sample)
    assert sides == {"fused": 36, "diffusers": 18}


def test_schedulers_fall_back_to_diffusers_for_uncovered_calls(fused_calls):
    x, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    # a zero-SNR schedule (β_T = 1), a learned variance's 2·C channels, a list of generators: diffusers' step
    theirs = DDPMScheduler(num_train_timesteps=100, rescale_betas_zero_snr=True)
    ours = GenfastDDPMScheduler.from_config(theirs.config)
    assert torch.equal(ours.step(eps, 99, x, generator=torch.Generator().manual_seed(0)).prev_sample,
                       theirs.step(eps, 99, x, generator=torch.Generator().manual_seed(0)).prev_sample)
    t = torch.tensor([99, 3])  # add_noise of that schedule: diffusers' code
    assert torch.equal(ours.add_noise(x, eps, t), theirs.add_noise(x, eps, t))
    theirs = DDPMScheduler(num_train_timesteps=100, variance_type="learned_range")
    ours = GenfastDDPMScheduler.from_config(theirs.config)
    both = torch.randn(2, 6, 4, 4)
    assert torch.equal(ours.step(both, 50, x, generator=torch.Generator().manual_seed(0)).prev_sample,
                       theirs.step(both, 50, x, generator=torch.Generator().manual_seed(0)).prev_sample)
    generators = [torch.Generator().manual_seed(i) for i in range(2)]
    ours = GenfastDDPMScheduler(num_train_timesteps=100)
    ours.step(eps, 50, x, generator=generators)
    assert fused_calls == []
    # the defaults fuse
    ours.step(eps, 50, x)
    assert fused_calls == ["ddpm_step"]
    # DDIM without set_timesteps: diffusers' own error
    with pytest.raises(ValueError, match="set_timesteps"):
        GenfastDDIMScheduler().step(eps, 10, x)


@pytest.mark.parametrize("timestep", [100, -1])
def test_a_tensor_timestep_out_of_range_is_one_line_naming_t(timestep):
    """After set_timesteps, a one-element tensor timestep outside [0, T): the step's own check of t, not an
    indexing error of the table of previous timesteps (nor a silent wrap-around for −1)."""
    ours = GenfastDDPMScheduler(num_train_timesteps=100)
    ours.set_timesteps(10)
    x, eps = torch.randn(2, 3, 4, 4), torch.randn(2, 3, 4, 4)
    with pytest.raises(ValueError, match=r"timestep must be in \[0, 100\)"):
        ours.step(eps, torch.tensor(timestep), x)


def test_missing_diffusers_raises_an_import_error_naming_the_extra(monkeypatch):
    monkeypatch.setitem(sys.modules, "diffusers", None)  # `import diffusers` now raises ImportError
    monkeypatch.delitem(sys.modules, "genfast.integrations.diffusers")
    with pytest.raises(ImportError, match=r'pip install "genfast\[diffusers\]"'):
        importlib.import_module("genfast.integrations.diffusers")
    # and importing genfast does not need diffusers
    assert genfast.integrations.__name__ == "genfast.integrations"


def test_apply_rejects_a_non_module():
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        apply_genfast("unet")
    with pytest.raises(TypeError, match="model must be a torch.nn.Module"):
        revert_genfast(None)
