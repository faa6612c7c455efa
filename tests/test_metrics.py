"""Latent-space metrics on constructed cases with known answers."""
import math

import pytest
import torch

from genfast.metrics import (active_units, bernoulli_entropy_floor, factor_latent_mi, interpolation_smoothness,
                             mutual_information_gap)


def test_active_units_counts_dims_whose_mean_varies():
    mu = torch.randn(500, 6) * torch.tensor([1.0, 0.5, 0.0, 0.05, 0.2, 1e-3])
    # variances ≈ 1, 0.25, 0, 0.0025, 0.04, 1e-6: three above 0.01
    assert active_units(mu) == 3
    assert active_units(mu, threshold=0.1) == 2
    assert active_units(mu, threshold=0.0) == 5  # the constant dim has variance exactly 0
    assert active_units(torch.ones(10, 4) * 3.0) == 0


def test_mig_is_one_when_each_latent_copies_one_factor():
    factors = torch.randint(0, 5, (4000, 3)).float() / 4  # 5 levels each, like a grid of generative factors
    latents = torch.cat([factors[:, [2, 0, 1]] * 3.0 - 1.0, torch.randn(4000, 2)], dim=1)  # permuted, rescaled
    assert mutual_information_gap(latents, factors) == pytest.approx(1.0, abs=0.01)


def test_mig_is_near_zero_for_noise_and_for_duplicated_latents():
    factors = torch.randint(0, 5, (4000, 2)).float()
    assert mutual_information_gap(torch.randn(4000, 4), factors) < 0.02
    # two latents that both copy the factor: no gap, though each carries all the information
    duplicated = torch.cat([factors[:, :1], factors[:, :1], factors[:, 1:], factors[:, 1:]], dim=1)
    assert mutual_information_gap(duplicated, factors) == pytest.approx(0.0, abs=1e-9)


def test_mig_of_a_half_informative_latent():
    """v uniform on 4 values (H = ln 4); z_0 = v // 2 carries I = ln 2, z_1 is noise: MIG = ln 2 / ln 4 = 0.5."""
    v = torch.arange(4000) % 4
    latents = torch.stack([(v // 2).float(), torch.randn(4000)], dim=1)
    mig = mutual_information_gap(latents, v[:, None].float())
    assert mig == pytest.approx(0.5, abs=0.01)


def test_mig_bins_continuous_factors():
    factors = torch.rand(5000, 1)
    latents = torch.cat([factors.exp(), torch.randn(5000, 1)], dim=1)  # monotone in the factor, not linear
    assert mutual_information_gap(latents, factors, num_bins=10) > 0.6


def test_mig_rejects_bad_input():
    with pytest.raises(ValueError, match="same number of rows"):
        mutual_information_gap(torch.randn(10, 3), torch.rand(9, 2))
    with pytest.raises(ValueError, match="at least 2 dims"):
        mutual_information_gap(torch.randn(10, 1), torch.rand(10, 2))
    with pytest.raises(ValueError, match="constant"):
        mutual_information_gap(torch.randn(10, 3), torch.ones(10, 1))
    with pytest.raises(ValueError, match="num_bins"):
        mutual_information_gap(torch.randn(10, 3), torch.rand(10, 1), num_bins=1)
    with pytest.raises(ValueError, match=r"shape \(N, D\)"):
        mutual_information_gap(torch.randn(10), torch.rand(10, 1))


def test_interpolation_smoothness_of_linear_paths_and_jumps():
    start, end = torch.rand(3, 2, 4, 4), torch.rand(3, 2, 4, 4)
    w = torch.linspace(0, 1, 7).view(1, 7, 1, 1, 1)
    linear = torch.lerp(start[:, None], end[:, None], w)
    assert interpolation_smoothness(linear) == pytest.approx(1.0, abs=1e-6)
    jump = torch.where(w < 0.5, start[:, None], end[:, None]).expand_as(linear)
    assert interpolation_smoothness(jump) == pytest.approx(6.0)  # steps − 1
    # one path linear, one jumping: the mean of 1 and 6
    mixed = torch.stack([linear[0], jump[0]])
    assert interpolation_smoothness(mixed) == pytest.approx(3.5)
    # an ease-in path (w²) is less even than the linear one
    assert interpolation_smoothness(torch.lerp(start[:, None], end[:, None], w ** 2)) > 1.5
    still = start[:, None].expand(3, 5, 2, 4, 4)
    assert interpolation_smoothness(still) == 1.0


def test_interpolation_smoothness_rejects_bad_input():
    with pytest.raises(ValueError, match="steps >= 3"):
        interpolation_smoothness(torch.rand(2, 2, 1, 4, 4))
    with pytest.raises(ValueError, match=r"\(N, steps, C, H, W\)"):
        interpolation_smoothness(torch.rand(2, 5, 4, 4))
    with pytest.raises(TypeError, match="floating-point"):
        interpolation_smoothness(torch.zeros(2, 5, 1, 4, 4, dtype=torch.long))


def test_mig_formula_matches_a_hand_computation():
    """Three latents against one binary factor: I(z_0; v) = H(v) = ln 2, z_1 = v xor noise with P(flip) = 1/4."""
    n = 4000
    v = torch.arange(n) % 2
    flip = (torch.arange(n) // 2) % 4 == 0  # exactly a quarter of each value of v flipped
    latents = torch.stack([v.float(), (v ^ flip.long()).float(), torch.zeros(n)], dim=1)
    h = math.log(2)
    i_flip = h - (-(0.25 * math.log(0.25) + 0.75 * math.log(0.75)))  # H(v) − H(v | z_1)
    expected = (h - i_flip) / h
    assert mutual_information_gap(latents, v[:, None].float()) == pytest.approx(expected, abs=1e-9)


def test_factor_latent_mi_locates_each_factor_and_matches_mig():
    """z_1 copies factor 0, z_0 = v_1 // 2 carries half of factor 1 (uniform on 4 values), z_2 is noise."""
    n = 4000
    v0, v1 = torch.randint(0, 5, (n,)).float(), torch.arange(n) % 4
    factors, latents = torch.stack([v0, v1.float()], 1), torch.stack([(v1 // 2).float(), v0, torch.randn(n)], 1)
    m = factor_latent_mi(latents, factors)
    assert m.shape == (2, 3) and bool(((m >= 0) & (m <= 1)).all())
    assert m.argmax(dim=1).tolist() == [1, 0]
    assert m[0, 1] == pytest.approx(1.0, abs=1e-9) and m[1, 0] == pytest.approx(0.5, abs=1e-9)
    assert m[:, 2].max() < 0.02
    top = m.topk(2, dim=1).values
    assert mutual_information_gap(latents, factors) == pytest.approx(float((top[:, 0] - top[:, 1]).mean()))
    with pytest.raises(ValueError, match="constant"):
        factor_latent_mi(latents, torch.ones(n, 1))


def test_bernoulli_entropy_floor_is_the_least_bce():
    x = torch.tensor([[0.0, 1.0, 0.5, 0.25]])
    h = math.log(2) - (0.25 * math.log(0.25) + 0.75 * math.log(0.75))  # 0 for the binary pixels
    assert bernoulli_entropy_floor(x).tolist() == pytest.approx([h])
    images = torch.rand(3, 2, 4, 4, dtype=torch.float64)
    floor = bernoulli_entropy_floor(images)

    def bce(logits):
        return torch.nn.functional.binary_cross_entropy_with_logits(logits, images, reduction="none").flatten(1).sum(1)

    assert bce(torch.logit(images)).tolist() == pytest.approx(floor.tolist(), rel=1e-9)  # the exact logits reach it
    assert bool((bce(torch.randn_like(images)) > floor).all())  # any others exceed it
    with pytest.raises(ValueError, match=r"\[0, 1\]"):
        bernoulli_entropy_floor(torch.full((1, 3), 1.5))
    with pytest.raises(TypeError, match="floating-point"):
        bernoulli_entropy_floor(torch.zeros(2, 3, dtype=torch.long))
