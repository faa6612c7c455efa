"""Convergence (Liger-Kernel style): each reference model trained for a few steps from the same seed with the
reference backend and with each kernel backend (the Triton kernels, in the interpreter on the CPU, and the C++
kernels) gives the same loss curve and the same final parameters, and the loss goes down. The models are tiny
because the interpreter runs each Triton program in numpy (about 15 ms a program): one GroupNorm+SiLU forward and
backward at batch 2, one group, costs ~70 ms."""
import pytest
import torch

import genfast
from genfast.models import DDPM, ConvVAE, Critic, Generator, UNet

# Both backends compute the same fp32 math in a different order (the Triton GroupNorm reduces a tile, the reference
# a whole group; the per-sample norms of the gradient penalty likewise), so single ops agree to ~1e-6 relative.
# A few optimizer steps carry that forward; measured over these runs the curves agree to < 1e-5 relative and the
# parameters to < 1e-6. The bounds leave a 10× margin yet catch a real kernel bug, which shifts the first loss
# already by far more than 1e-4.
LOSS_RTOL = 1e-4
PARAM_ATOL = 1e-5
PARAM_RTOL = 1e-4
# Steps per run (bounded by the interpreter's cost) and Adam learning rates; a run's final loss must be below
# *_DROP times its first (measured on these seeds: VAE 0.92, DDPM 0.81 on a fixed draw of t and ε).
VAE_STEPS, VAE_DROP = 8, 0.95
DDPM_STEPS, DDPM_DROP = 5, 0.9
WGAN_STEPS = 20
LEARNING_RATE = 1e-2  # VAE and DDPM: large, so that a few steps visibly lower the loss
WGAN_LEARNING_RATE = 1e-3


def _train_vae(backend: str):
    with genfast.use_backend(backend):
        torch.manual_seed(0)
        model = ConvVAE(image_size=28, in_channels=1, latent_dim=4, base_channels=4, num_groups=1)
        x = (torch.rand(2, 1, 28, 28) > 0.5).float()  # binary: the Bernoulli likelihood can approach 0
        optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
        losses = []
        for _ in range(VAE_STEPS):
            optimizer.zero_grad()
            loss = model.loss(x)["loss"]
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses, model


def _tiny_ddpm() -> DDPM:
    unet = UNet(image_size=8, in_channels=1, base_channels=4, channel_mult=(1,), num_res_blocks=1,
                attention_resolutions=(), num_groups=1)
    return DDPM(unet=unet, schedule=genfast.NoiseSchedule.linear(100))


def _train_ddpm(backend: str):
    with genfast.use_backend(backend):
        torch.manual_seed(0)
        model = _tiny_ddpm()
        x0 = torch.rand(2, 1, 8, 8) * 2 - 1
        optimizer = torch.optim.Adam(model.parameters(), lr=LEARNING_RATE)
        losses = []
        for _ in range(DDPM_STEPS):
            optimizer.zero_grad()
            loss = model.loss(x0)
            loss.backward()
            optimizer.step()
            losses.append(loss.item())
    return losses, model, x0


def _fixed_draw_loss(model: DDPM, x0: torch.Tensor) -> float:
    """The DDPM loss of x0 repeated 16 times on one fixed draw of t and ε (the training loss draws new ones each
    step, too noisy to judge a few steps by), on the reference backend."""
    with genfast.use_backend("reference"), torch.no_grad():
        return model.loss(x0.repeat(8, 1, 1, 1), generator=torch.Generator().manual_seed(1)).item()


def _train_wgan(backend: str):
    """Alternating critic and generator steps (one each), critic loss = E[D(fake)] − E[D(real)] + GP."""
    with genfast.use_backend(backend):
        torch.manual_seed(0)
        generator = Generator(image_size=28, latent_dim=8, out_channels=1, base_channels=4)
        critic = Critic(image_size=28, in_channels=1, base_channels=4)
        real = torch.rand(4, 1, 28, 28) * 2 - 1
        opt_g = torch.optim.Adam(generator.parameters(), lr=WGAN_LEARNING_RATE, betas=(0.0, 0.9))
        opt_c = torch.optim.Adam(critic.parameters(), lr=WGAN_LEARNING_RATE, betas=(0.0, 0.9))
        critic_losses, penalties = [], []
        for _ in range(WGAN_STEPS):
            fake = generator(torch.randn(4, 8)).detach()
            penalty = genfast.gradient_penalty(critic, real, fake, weight=10.0)
            loss_c = critic(fake).mean() - critic(real).mean() + penalty
            opt_c.zero_grad()
            loss_c.backward()
            opt_c.step()
            loss_g = -critic(generator(torch.randn(4, 8))).mean()
            opt_g.zero_grad()
            loss_g.backward()
            opt_g.step()
            critic_losses.append(loss_c.item())
            penalties.append(penalty.item())
    return critic_losses, penalties, torch.nn.ModuleList([generator, critic])


def _assert_same_parameters(a: torch.nn.Module, b: torch.nn.Module):
    for (name, p), q in zip(a.named_parameters(), b.parameters()):
        torch.testing.assert_close(q, p, atol=PARAM_ATOL, rtol=PARAM_RTOL, msg=lambda m: f"{name}: {m}")


def test_vae_converges_the_same_on_every_backend(kernel_backend):
    ref_losses, ref_model = _train_vae("reference")
    tri_losses, tri_model = _train_vae(kernel_backend)
    torch.testing.assert_close(torch.tensor(tri_losses), torch.tensor(ref_losses), rtol=LOSS_RTOL, atol=0)
    _assert_same_parameters(ref_model, tri_model)
    assert ref_losses[-1] < VAE_DROP * ref_losses[0], ref_losses


def test_ddpm_converges_the_same_on_every_backend(kernel_backend):
    ref_losses, ref_model, x0 = _train_ddpm("reference")
    tri_losses, tri_model, _ = _train_ddpm(kernel_backend)
    torch.testing.assert_close(torch.tensor(tri_losses), torch.tensor(ref_losses), rtol=LOSS_RTOL, atol=0)
    _assert_same_parameters(ref_model, tri_model)
    # conv_out starts at zero, so ε̂ = 0 and the first loss is mean(ε²) ≈ 1
    assert ref_losses[0] == pytest.approx(1.0, abs=0.3)
    torch.manual_seed(0)
    before, after = _fixed_draw_loss(_tiny_ddpm(), x0), _fixed_draw_loss(ref_model, x0)
    assert after < DDPM_DROP * before, (before, after)


def test_wgan_gp_converges_the_same_on_every_backend(kernel_backend):
    ref_critic, ref_penalty, ref_models = _train_wgan("reference")
    tri_critic, tri_penalty, tri_models = _train_wgan(kernel_backend)
    torch.testing.assert_close(torch.tensor(tri_critic), torch.tensor(ref_critic), rtol=LOSS_RTOL, atol=1e-5)
    torch.testing.assert_close(torch.tensor(tri_penalty), torch.tensor(ref_penalty), rtol=LOSS_RTOL, atol=1e-5)
    _assert_same_parameters(ref_models, tri_models)
    # the critic learns to separate real from fake: its loss falls below zero (means of 5 steps: the curve is noisy)
    first, last = sum(ref_critic[:5]) / 5, sum(ref_critic[-5:]) / 5
    assert last < min(0.0, first), ref_critic
