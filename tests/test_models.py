"""The reference models: shapes, finite losses, gradients, bad input, and the VAE / DDPM helpers (reference
backend; the Triton path is covered by tests/test_convergence.py)."""
import pytest
import torch

import genfast
from genfast.models import DDPM, ConvVAE, Critic, Generator, UNet
from genfast.models.unet import ResBlock, timestep_embedding


@pytest.fixture(autouse=True)
def _reference_backend():
    """The models' math on the reference ops; tests/test_convergence.py compares backends."""
    with genfast.use_backend("reference"):
        yield


def _tiny_unet(**overrides):
    config = dict(image_size=16, in_channels=3, base_channels=8, channel_mult=(1, 2), num_res_blocks=1,
                  attention_resolutions=(8,), num_groups=4)
    config.update(overrides)
    return UNet(**config)


def _assert_all_parameters_get_gradients(module):
    for name, p in module.named_parameters():
        assert p.grad is not None, f"{name} got no gradient"
        assert torch.isfinite(p.grad).all(), name
    assert any(p.grad.abs().sum() > 0 for p in module.parameters())


@pytest.mark.parametrize("image_size, channels", [(64, 3), (32, 1), (28, 1)])
def test_vae_shapes_loss_and_gradients(image_size, channels):
    model = ConvVAE(image_size=image_size, in_channels=channels, latent_dim=6, base_channels=8)
    x = torch.rand(3, channels, image_size, image_size)
    mu, logvar = model.encode(x)
    assert mu.shape == logvar.shape == (3, 6)
    assert model.decode(mu).shape == x.shape
    out = model.loss(x, generator=torch.Generator().manual_seed(3))
    assert set(out) == {"loss", "recon", "kl"} and all(v.dim() == 0 for v in out.values())
    # kl and recon are ≥ 0 by construction: compare them with their formulas instead (the same ε)
    z, kl = genfast.reparameterize_kl(mu, logvar, generator=torch.Generator().manual_seed(3))
    recon = torch.nn.functional.binary_cross_entropy(model.decode(z), x, reduction="sum") / 3
    torch.testing.assert_close(out["kl"], kl.mean())
    torch.testing.assert_close(out["recon"], recon, rtol=1e-4, atol=1e-3)
    torch.testing.assert_close(out["loss"], out["recon"] + out["kl"])
    out["loss"].backward()
    _assert_all_parameters_get_gradients(model)
    samples = model.sample(5)
    assert samples.shape == (5, channels, image_size, image_size)
    assert samples.min() >= 0 and samples.max() <= 1


def test_vae_loss_is_recon_plus_beta_kl_with_per_image_sums():
    x = torch.rand(4, 1, 28, 28)
    for recon_loss in ("bce", "mse"):
        model = ConvVAE(image_size=28, in_channels=1, latent_dim=4, base_channels=8, beta=4.0,
                        recon_loss=recon_loss)
        out = model.loss(x, generator=torch.Generator().manual_seed(3))
        torch.testing.assert_close(out["loss"], out["recon"] + 4.0 * out["kl"])
        # the same ε: rebuild the terms from the public ops
        mu, logvar = model.encode(x)
        z, kl = genfast.reparameterize_kl(mu, logvar, generator=torch.Generator().manual_seed(3))
        y = model.decode(z)
        per_image = (torch.nn.functional.binary_cross_entropy(y, x, reduction="none") if recon_loss == "bce"
                     else (y - x) ** 2).flatten(1).sum(1)
        torch.testing.assert_close(out["recon"], per_image.mean(), rtol=1e-4, atol=1e-3)
        torch.testing.assert_close(out["kl"], kl.mean())


def test_vae_interpolate_endpoints_are_the_reconstructions():
    model = ConvVAE(image_size=32, in_channels=1, latent_dim=8, base_channels=8).eval()
    x1, x2 = torch.rand(2, 1, 32, 32), torch.rand(2, 1, 32, 32)
    frames = model.interpolate(x1, x2, steps=5)
    assert frames.shape == (2, 5, 1, 32, 32)
    torch.testing.assert_close(frames[:, 0], model.reconstruct(x1))
    torch.testing.assert_close(frames[:, -1], model.reconstruct(x2))
    # the middle frame decodes the midpoint of the posterior means
    midpoint = (model.encode(x1)[0] + model.encode(x2)[0]) / 2
    torch.testing.assert_close(frames[:, 2], model.decode(midpoint))


def test_vae_sample_is_reproducible_with_a_generator():
    model = ConvVAE(image_size=28, in_channels=1, latent_dim=4, base_channels=8)
    a = model.sample(3, generator=torch.Generator().manual_seed(7))
    b = model.sample(3, generator=torch.Generator().manual_seed(7))
    torch.testing.assert_close(a, b)


def test_vae_rejects_bad_arguments_and_inputs():
    with pytest.raises(ValueError, match="image_size must be one of"):
        ConvVAE(image_size=48)
    with pytest.raises(ValueError, match="recon_loss"):
        ConvVAE(recon_loss="l1")
    with pytest.raises(ValueError, match="beta"):
        ConvVAE(beta=-1.0)
    with pytest.raises(ValueError, match="num_groups"):
        ConvVAE(base_channels=12, num_groups=8)
    model = ConvVAE(image_size=28, in_channels=1, latent_dim=4, base_channels=8)
    with pytest.raises(ValueError, match=r"x must have shape \(B, 1, 28, 28\)"):
        model.loss(torch.rand(2, 3, 28, 28))
    with pytest.raises(ValueError, match=r"x must have shape"):
        model.encode(torch.rand(1, 28, 28))
    with pytest.raises(TypeError, match="floating-point"):
        model.encode(torch.zeros(2, 1, 28, 28, dtype=torch.uint8))
    with pytest.raises(ValueError, match=r"z must be a tensor of shape \(B, 4\)"):
        model.decode(torch.zeros(2, 5))
    with pytest.raises(ValueError, match="steps must be >= 2"):
        model.interpolate(torch.rand(1, 1, 28, 28), torch.rand(1, 1, 28, 28), steps=1)


@pytest.mark.parametrize("image_size, channels", [(64, 3), (32, 1), (28, 1)])
def test_wgan_shapes_and_gradient_penalty(image_size, channels):
    generator = Generator(latent_dim=16, image_size=image_size, out_channels=channels, base_channels=8)
    critic = Critic(image_size=image_size, in_channels=channels, base_channels=8)
    assert generator.latent_dim == 16
    fake = generator(torch.randn(3, 16))
    assert fake.shape == (3, channels, image_size, image_size)
    assert fake.min() >= -1 and fake.max() <= 1
    real = torch.rand(3, channels, image_size, image_size) * 2 - 1
    scores = critic(real)
    assert scores.shape == (3,)
    alpha = torch.rand(3)
    penalty = genfast.gradient_penalty(critic, real, fake.detach(), alpha=alpha)
    # the penalty is ≥ 0 by construction: compare it with the textbook formula instead
    x_hat = (alpha.view(-1, 1, 1, 1) * real + (1 - alpha.view(-1, 1, 1, 1)) * fake.detach()).requires_grad_()
    (g,) = torch.autograd.grad(critic(x_hat).sum(), x_hat)
    torch.testing.assert_close(penalty, 10.0 * (g.flatten(1).norm(dim=1) - 1).square().mean())
    loss = critic(fake).mean() - scores.mean() + penalty
    loss.backward()
    _assert_all_parameters_get_gradients(critic)
    _assert_all_parameters_get_gradients(generator)
    assert not any(isinstance(m, torch.nn.modules.batchnorm._BatchNorm) for m in critic.modules())


def test_critic_scores_samples_independently():
    critic = Critic(image_size=32, in_channels=1, base_channels=8)
    x = torch.randn(4, 1, 32, 32)
    torch.testing.assert_close(critic(x)[1:2], critic(x[1:2]))


def test_wgan_rejects_bad_inputs():
    with pytest.raises(ValueError, match="image_size must be one of"):
        Generator(image_size=16)
    with pytest.raises(ValueError, match=r"z must be a tensor of shape \(B, 8\)"):
        Generator(latent_dim=8, image_size=32, base_channels=8)(torch.randn(2, 9))
    with pytest.raises(ValueError, match=r"x must have shape \(B, 3, 64, 64\)"):
        Critic(base_channels=8)(torch.randn(2, 3, 32, 32))


@pytest.mark.parametrize("scale_shift", [False, True])
@pytest.mark.parametrize("attention_resolutions", [(), (8,)])
def test_unet_shapes_and_gradients(scale_shift, attention_resolutions):
    unet = _tiny_unet(scale_shift=scale_shift, attention_resolutions=attention_resolutions)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([0, 999])
    assert unet(x, t).shape == x.shape
    # make the zero-initialised output layers non-zero so that every parameter gets a gradient
    for module in unet.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.normal_(module.weight, std=0.1)
    model = DDPM(unet=unet)
    loss = model.loss(x)
    assert loss.dim() == 0 and torch.isfinite(loss), "a NaN check only: the loss's values are tested in test_diffusion"
    loss.backward()
    _assert_all_parameters_get_gradients(unet)
    n_attention = sum(type(m).__name__ == "AttentionBlock" for m in unet.modules())
    assert n_attention == (1 + 3 * bool(attention_resolutions))  # middle, + one down and two up blocks at 8×8


def test_unet_starts_at_zero_and_depends_on_the_timestep():
    unet = _tiny_unet()
    x = torch.randn(2, 3, 16, 16)
    assert unet(x, torch.tensor([3, 700])).abs().max() == 0  # conv_out is zero-initialised (Ho et al.)
    torch.nn.init.normal_(unet.conv_out.weight, std=0.1)
    for module in unet.modules():
        if type(module).__name__ == "ResBlock":
            torch.nn.init.normal_(module.conv2.weight, std=0.1)
    a, b = unet(x, torch.tensor([3, 3])), unet(x, torch.tensor([700, 700]))
    assert (a - b).abs().max() > 1e-3


def _t_blind_blocks(unet: UNet, t: tuple[int, int] = (0, 999), rtol: float = 1e-3) -> list[str]:
    """The ResBlocks of ``unet`` whose output does not depend on the timestep: each block is run on the input it
    receives for t[0] (recorded by a hook), once with t[0]'s embedding and once with t[1]'s, so that a block is
    judged by what it does with the embedding, not by what the blocks before it did. conv2 (zero-initialised, which
    makes every block the identity at first) gets random weights."""
    torch.manual_seed(0)
    blocks = {name: m for name, m in unet.named_modules() if isinstance(m, ResBlock)}
    for block in blocks.values():
        torch.nn.init.normal_(block.conv2.weight, std=0.1)
    inputs = {}

    def record(name):
        def hook(module, args, output):
            inputs.setdefault(name, args)  # the first call's (a hook that returns something replaces the output)
        return hook

    hooks = [block.register_forward_hook(record(name)) for name, block in blocks.items()]
    x = torch.randn(2, unet.in_channels, unet.image_size, unet.image_size)
    with torch.no_grad():
        unet(x, torch.full((2,), t[0]))
        for hook in hooks:
            hook.remove()
        other = unet.time_mlp(timestep_embedding(torch.full((2,), t[1]), unet.base_channels))
        blind = []
        for name, block in blocks.items():
            h, emb = inputs[name]
            a, b = block(h, emb), block(h, other)
            if not (a - b).norm() > rtol * a.norm():
                blind.append(f"{name} ({block.conv1.out_channels} channels)")
    return blind


@pytest.mark.parametrize("config", [
    dict(image_size=32, base_channels=32, channel_mult=(1, 2, 2), num_res_blocks=1),  # the small CPU config
    dict(image_size=16, base_channels=64, channel_mult=(1, 2), num_res_blocks=1),  # the default width
    dict(image_size=16, base_channels=16, channel_mult=(1, 2, 4), num_res_blocks=2, num_groups=16),
], ids=["32-64-64", "64-128", "16-32-64"])
def test_every_residual_block_sees_the_timestep(config):
    """The time embedding reaches every ResBlock's output, at every width. With the embedding added before a
    GroupNorm whose groups hold one channel each (Ho et al.'s add, 32 groups of a 32-channel block), the norm
    subtracts it again exactly: the block cannot see t. The default (ADM's scale-shift after the norm) can."""
    unet = UNet(**config, attention_resolutions=())
    assert _t_blind_blocks(unet) == []
    old = UNet(**config, attention_resolutions=(), scale_shift=False)  # the default before issue 22
    widths = {config["base_channels"] * m for m in config["channel_mult"]}
    one_channel_groups = config.get("num_groups", 32) in widths
    assert bool(_t_blind_blocks(old)) == one_channel_groups  # the test sees the old configuration's blind blocks


def test_unet_channels_last_input_matches_contiguous():
    unet = _tiny_unet(scale_shift=True)
    for module in unet.modules():
        if isinstance(module, torch.nn.Conv2d):
            torch.nn.init.normal_(module.weight, std=0.1)
    x, t = torch.randn(2, 3, 16, 16), torch.tensor([5, 600])
    out = unet(x.to(memory_format=torch.channels_last), t)
    torch.testing.assert_close(out, unet(x, t), rtol=1e-4, atol=1e-5)
    # the loss's noise follows the memory order of x0 (genfast's noise convention), so it differs from the NCHW
    # loss's: check that it trains
    loss = DDPM(unet=unet).loss(x.to(memory_format=torch.channels_last))
    assert torch.isfinite(loss), "a NaN check only: that it trains is the parameter gradients' check below"
    loss.backward()
    _assert_all_parameters_get_gradients(unet)


def test_unet_rejects_bad_configurations_and_inputs():
    with pytest.raises(ValueError, match="num_groups"):
        UNet(base_channels=8, num_groups=32)
    with pytest.raises(ValueError, match="divisible by 2"):
        UNet(image_size=18, base_channels=8, num_groups=4, channel_mult=(1, 2, 2))
    with pytest.raises(ValueError, match="channel_mult"):
        UNet(channel_mult=())
    with pytest.raises(ValueError, match="dropout"):
        UNet(dropout=1.0)
    unet = _tiny_unet()
    with pytest.raises(ValueError, match=r"x must have shape \(B, 3, 16, 16\)"):
        unet(torch.randn(2, 3, 8, 8), torch.tensor([1, 2]))
    with pytest.raises(ValueError, match=r"t must be a tensor of shape \(2,\)"):
        unet(torch.randn(2, 3, 16, 16), torch.tensor([1]))


@pytest.mark.parametrize("sampler, steps, eta", [("ddpm", None, 0.0), ("ddim", 4, 0.0), ("ddim", 3, 1.0)])
def test_ddpm_sample_shapes(sampler, steps, eta):
    model = DDPM(unet=_tiny_unet(in_channels=1), schedule=genfast.NoiseSchedule.linear(10))
    images = model.sample(3, sampler=sampler, steps=steps, eta=eta, generator=torch.Generator().manual_seed(0))
    assert images.shape == (3, 1, 16, 16)
    assert torch.isfinite(images).all() and images.abs().max() <= 1
    again = model.sample(3, sampler=sampler, steps=steps, eta=eta, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(images, again)


def _far_off_ddpm(prediction_type="epsilon", **unet):
    """A DDPM whose untrained network's output is far off, so that x̂₀ leaves [-1, 1]."""
    model = DDPM(unet=_tiny_unet(in_channels=1, **unet), schedule=genfast.NoiseSchedule.linear(10),
                 prediction_type=prediction_type)
    torch.nn.init.normal_(model.unet.conv_out.weight, std=1.0)
    torch.nn.init.constant_(model.unet.conv_out.bias, 2.0)
    return model


def _manual_loop(model, sampler, steps, generator, **settings):
    """model.sample's loop written out with the public steps, each given ``settings``."""
    x = torch.randn(3, 1, 16, 16, generator=generator)
    timesteps = model._timesteps(sampler, steps)
    for t, t_prev in zip(timesteps, timesteps[1:] + [-1]):
        output = model.unet(x, torch.full((3,), t))
        if sampler == "ddpm":
            x = genfast.ddpm_step(output, t, x, model.schedule, generator=generator,
                                  prediction_type=model.prediction_type, **settings)
        else:
            x = genfast.ddim_step(output, t, t_prev, x, model.schedule, generator=generator,
                                  prediction_type=model.prediction_type, **settings)
    return x


@pytest.mark.parametrize("sampler, steps", [("ddpm", None), ("ddim", 4)])
def test_ddpm_sample_clips_x0_in_every_step_like_diffusers(sampler, steps):
    """By default each step clips x̂₀ to [-1, 1] (diffusers' clip_sample=True), so the samples, the last step's
    x̂₀, are images; clip_sample=False leaves them unbounded; thresholding replaces the clipping."""
    model = _far_off_ddpm()

    def sample(**settings):
        return model.sample(3, sampler=sampler, steps=steps, generator=torch.Generator().manual_seed(0), **settings)

    clipped, raw = sample(), sample(clip_sample=False)
    assert clipped.abs().max() <= 1 and raw.abs().max() > 2
    torch.testing.assert_close(clipped, _manual_loop(model, sampler, steps, torch.Generator().manual_seed(0),
                                                     clip_sample=True))
    torch.testing.assert_close(raw, _manual_loop(model, sampler, steps, torch.Generator().manual_seed(0),
                                                 clip_sample=False))
    settings = dict(thresholding=True, dynamic_thresholding_ratio=0.9, sample_max_value=3.0)
    thresholded = sample(**settings)
    assert thresholded.abs().max() <= 1 and not torch.equal(thresholded, clipped)
    torch.testing.assert_close(thresholded, _manual_loop(model, sampler, steps, torch.Generator().manual_seed(0),
                                                         **settings))


@pytest.mark.parametrize("prediction_type", ["epsilon", "v_prediction", "sample"])
def test_ddpm_prediction_type_sets_the_loss_target_and_the_steps(prediction_type):
    model = _far_off_ddpm(prediction_type)
    x0 = torch.rand(4, 1, 16, 16) * 2 - 1
    loss = model.loss(x0, generator=torch.Generator().manual_seed(1))
    expected = genfast.diffusion_loss(model.unet, x0, model.schedule, prediction_type=prediction_type,
                                      generator=torch.Generator().manual_seed(1))
    assert torch.equal(loss, expected)
    if prediction_type != "epsilon":  # another target than ε: another loss
        assert not torch.equal(loss, genfast.diffusion_loss(model.unet, x0, model.schedule,
                                                            generator=torch.Generator().manual_seed(1)))
    images = model.sample(3, sampler="ddim", steps=4, generator=torch.Generator().manual_seed(0))
    torch.testing.assert_close(images, _manual_loop(model, "ddim", 4, torch.Generator().manual_seed(0),
                                                    clip_sample=True))
    assert f"prediction_type='{prediction_type}'" in repr(model)


def test_ddim_with_eta_zero_depends_only_on_the_generator():
    """DDIM with η = 0 never draws noise after x_T: a generator only fixes x_T."""
    model = DDPM(unet=_tiny_unet(), schedule=genfast.NoiseSchedule.linear(10))
    torch.nn.init.normal_(model.unet.conv_out.weight, std=0.1)
    a = model.sample(2, sampler="ddim", steps=10, generator=torch.Generator().manual_seed(1))
    torch.manual_seed(123)  # the default generator is not used once a generator is given
    b = model.sample(2, sampler="ddim", steps=10, generator=torch.Generator().manual_seed(1))
    torch.testing.assert_close(a, b)


def test_ddpm_defaults_and_bad_arguments():
    model = DDPM(unet=_tiny_unet())
    assert model.schedule.num_steps == 1000
    torch.testing.assert_close(model.schedule.betas[[0, -1]], torch.tensor([1e-4, 0.02], dtype=torch.float64))
    with pytest.raises(TypeError, match="schedule"):
        DDPM(unet=_tiny_unet(), schedule="linear")
    assert model.prediction_type == "epsilon"
    with pytest.raises(ValueError, match="prediction_type must be one of"):
        DDPM(unet=_tiny_unet(), prediction_type="x0")
    with pytest.raises(TypeError, match="clip_sample must be a bool"):
        model.sample(1, sampler="ddim", steps=2, clip_sample=1)
    with pytest.raises(ValueError, match="sampler must be one of"):
        model.sample(1, sampler="euler")
    with pytest.raises(ValueError, match="steps must be None or 1000"):
        model.sample(1, sampler="ddpm", steps=10)
    with pytest.raises(ValueError, match="steps must be <= T"):
        model.sample(1, sampler="ddim", steps=2000)
    with pytest.raises(ValueError, match="eta"):
        model.sample(1, sampler="ddim", steps=2, eta=-1.0)
