"""How cleanly moving along a direction of a generative model's latent changes one known factor of the faces.

A :class:`Latent` is a map latent → image with a prior over latents: the VAE's and the WGAN's z (decoder /
generator), the DDIM starting noise x_T of a pixel DDPM or of a latent diffusion model (eta = 0: a deterministic
map x_T → image) and the LDM's first-stage VAE latent (decoded by the frozen VAE, starting from latents the LDM
samples). :func:`controllability` measures it with the factor predictor of :mod:`genfast.feature_net`:

1. Directions. Per factor f, the *found* direction d_f: the unit vector of the ridge regression of f (as predicted
   on the images of ``fit`` latents) on the latents, i.e. the direction a user would find from labelled samples;
   plus ``num_random`` random unit directions (seeded).
2. Traversals. For ``starts`` fresh latents z0 from the prior and each direction d: images of z0 + a·d for a in
   ``alphas`` (default −2, −1, 0, 1, 2: the prior has unit variance along any unit direction, so a is in prior
   standard deviations for every model), and their predicted factors.
3. Slopes. s_g(d) = the least-squares slope of predicted factor g against a, averaged over the starts (factor
   units, [0, 1], per prior standard deviation).

Reported: per factor f, ``response`` s_f(d_f) (> 0: the found direction moves f the intended way) and
``cleanliness`` |s_f(d_f)| / Σ_g |s_g(d_f)| (1 = only f changes, 1/5 = the change is spread evenly over the five
factors); their means over the factors; ``control`` = mean over f of max(s_f(d_f), 0)·cleanliness_f (0 = no
control); and for the random directions the mean of max_g |s_g| (``random_strength``) and of
max_g |s_g| / Σ_g |s_g| (``random_cleanliness``)."""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import torch
from torch import Tensor

from .data import FACE_FACTORS

ALPHAS = (-2.0, -1.0, 0.0, 1.0, 2.0)
CHUNK = 64  # latents decoded at a time


@dataclass
class Latent:
    """A latent space to traverse: ``shape`` (without the batch), ``prior(n, generator)`` → latents (n, *shape),
    ``decode(latents)`` → images (n, C, S, S) in [0, 1]; ``what`` describes it in the report."""

    name: str
    shape: tuple[int, ...]
    prior: Callable[[int, torch.Generator], Tensor]
    decode: Callable[[Tensor], Tensor]
    what: str
    inner: Callable[[Tensor], Tensor] | None = None  # ldm x_T: the first-stage latent it leads to (decode = VAE∘inner)

    @torch.no_grad()
    def images(self, latents: Tensor) -> Tensor:
        return torch.cat([self.decode(chunk).clamp(0, 1) for chunk in latents.split(CHUNK)])


def _normal(shape, device):
    def prior(n, generator):
        return torch.randn(n, *shape, generator=generator, device=device)
    return prior


def latents_of(model: str, task, *, sample_steps: int) -> list[Latent]:
    """The latents of a trained ``task`` of ``model`` (vae, wgan, ddpm, ldm; the averaged weights): one, or for ldm
    two (x_T and the first-stage VAE latent)."""
    device = task.device
    if model == "vae":
        vae = task.averaged("model").eval()
        return [Latent("vae", tuple(vae.latent_shape), _normal(vae.latent_shape, device), vae.decode,
                       f"z ({vae.latent_dim} dims), decoded")]
    if model == "wgan":
        g = task.averaged("generator").eval()
        return [Latent("wgan", (g.latent_dim,), _normal((g.latent_dim,), device), lambda z: (g(z) + 1) / 2,
                       f"z ({g.latent_dim} dims) through the generator")]
    ddim = dict(sampler="ddim", steps=sample_steps, eta=0.0)
    if model == "ddpm":
        m = task.averaged("model").eval()
        shape = (m.unet.in_channels, m.unet.image_size, m.unet.image_size)
        return [Latent("ddpm", shape, _normal(shape, device),
                       lambda x: (m.sample(x.shape[0], noise=x, **ddim) + 1) / 2,
                       f"DDIM x_T ({'×'.join(map(str, shape))} pixel-shaped noise), {sample_steps} steps, eta 0")]
    if model == "ldm":
        m = task.averaged("model").eval()
        shape = tuple(m.latent_shape)

        def sampled_latents(n, generator):  # first-stage latents s·z as the LDM generates them
            return m.ddpm.sample(n, generator=generator, clip_sample=False, **ddim)

        dims = "×".join(map(str, shape))
        def inner(x):
            return m.ddpm.sample(x.shape[0], noise=x, clip_sample=False, **ddim)

        return [Latent("ldm", shape, _normal(shape, device), lambda x: m.decode(inner(x)),
                       f"DDIM x_T in latent space ({dims}), {sample_steps} steps, eta 0", inner=inner),
                Latent("ldm (VAE z)", shape, sampled_latents, m.decode,
                       f"the first-stage VAE's scaled latent s·z ({dims}), from the LDM's own samples, decoded "
                       "(not N(0, I): a is in units of the unit-variance scaled latent, not of a prior s.d.)")]
    raise ValueError(f"model must be one of vae, wgan, ddpm, ldm, got {model!r}")


@torch.no_grad()
def generate(latents: list[Latent], num: int, generator: torch.Generator) -> tuple[list[Tensor], Tensor]:
    """(``num`` latents of each of ``latents`` — the first drawn from its prior, a second one, if any, what the
    first leads to — and the images in [0, 1]): the samples of the model, with the latents they come from."""
    first = latents[0]
    z = first.prior(num, generator)
    if first.inner is None:
        return [z], first.images(z)
    nxt = torch.cat([first.inner(chunk) for chunk in z.split(CHUNK)])
    return [z, nxt], latents[1].images(nxt)


def ridge_directions(latents: Tensor, factors: Tensor, *, ridge: float = 0.1) -> Tensor:
    """Unit directions (F, D) of the ridge regressions of each factor column (N, F) on the flattened ``latents``
    (N, D), in the dual form W = Zᵀ(ZZᵀ + λI)⁻¹Y (Z, Y centred; λ = ``ridge``·mean ‖z‖²), which is cheap for D ≫ N."""
    z = latents.flatten(1).double()
    z = z - z.mean(0)
    y = factors.double() - factors.double().mean(0)
    gram = z @ z.T
    lam = ridge * float(gram.diagonal().mean()) + 1e-12
    w = z.T @ torch.linalg.solve(gram + lam * torch.eye(len(z), dtype=z.dtype, device=z.device), y)
    return (w / w.norm(dim=0).clamp_min(1e-12)).T.float()


def slopes(alphas: Tensor, values: Tensor) -> Tensor:
    """The least-squares slope of ``values`` (B, A, F) against ``alphas`` (A,), averaged over B: (F,)."""
    a = alphas.double() - alphas.double().mean()
    v = values.double() - values.double().mean(dim=1, keepdim=True)
    return (torch.einsum("a,baf->bf", a, v) / (a * a).sum()).mean(0).float()


@torch.no_grad()
def controllability(latent: Latent, net, *, generator: torch.Generator, fit: tuple[Tensor, Tensor] | None = None,
                    fit_num: int = 256, num_random: int = 3, starts: int = 4, alphas=ALPHAS,
                    names=FACE_FACTORS) -> dict:
    """The controllability of ``latent`` (module docstring), with ``net`` the factor predictor. ``fit``: (latents,
    their images' predicted factors) to find the directions from; default ``fit_num`` fresh prior samples. Returns
    the measures, the slopes per direction and ``traversals``: the images (directions, A, C, S, S) of the first
    start (found directions first, in factor order)."""
    if fit is None:
        z = latent.prior(fit_num, generator)
        fit = (z, _factors(net, latent.images(z)))
    found = ridge_directions(*fit)
    device = fit[0].device
    dims = int(torch.tensor(latent.shape).prod())
    random = torch.randn(num_random, dims, generator=generator, device=device)
    random = random / random.norm(dim=1, keepdim=True)
    directions = torch.cat([found.to(device), random])
    a = torch.tensor(alphas, dtype=torch.float32, device=device)
    z0 = latent.prior(starts, generator).flatten(1)
    all_slopes, traversals = [], []
    for d in directions:
        z = (z0[:, None] + a[None, :, None] * d).reshape(starts * len(a), *latent.shape)
        images = latent.images(z)
        values = _factors(net, images).view(starts, len(a), -1)
        all_slopes.append(slopes(a.cpu(), values.cpu()))
        traversals.append(images.view(starts, len(a), *images.shape[1:])[0].cpu())
    s = torch.stack(all_slopes)  # (directions, F)
    k = len(names)
    per_factor = {}
    for f, name in enumerate(names):
        row = s[f]
        per_factor[name] = dict(response=float(row[f]), cleanliness=_share(row, f),
                                slopes=[float(v) for v in row])
    rand = s[k:]
    result = dict(latent=latent.name, what=latent.what, dims=dims, alphas=list(map(float, alphas)), starts=starts,
                  fit_num=int(fit[0].shape[0]), num_random=num_random, per_factor=per_factor,
                  response=_mean([p["response"] for p in per_factor.values()]),
                  cleanliness=_mean([p["cleanliness"] for p in per_factor.values()]),
                  control=_mean([max(p["response"], 0.0) * p["cleanliness"] for p in per_factor.values()]),
                  random_strength=_mean([float(r.abs().max()) for r in rand]) if len(rand) else None,
                  random_cleanliness=_mean([_share(r, int(r.abs().argmax())) for r in rand]) if len(rand) else None,
                  random_slopes=[[float(v) for v in r] for r in rand])
    return dict(result, traversals=torch.stack(traversals))


def _factors(net, images: Tensor) -> Tensor:
    return torch.cat([net.predict_factors(chunk.to(next(net.parameters()).device)) for chunk in images.split(256)])


def _share(row: Tensor, f: int) -> float:
    total = float(row.abs().sum())
    return float(row[f].abs()) / total if total > 0 else 0.0


def _mean(values) -> float:
    values = list(values)
    return sum(values) / len(values)
