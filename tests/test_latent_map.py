"""``genfast example latent-map``: its files, the consistency of the measured numbers, the report written from them,
and one-line errors for bad flags and paths."""
import json
import math
import re

import pytest
import torch
from PIL import Image

from genfast import latent_map
from genfast.cli import main as genfast_main
from genfast.data import digit_labels, load_dataset
from genfast.training import UsageError, split_indices

pytest.importorskip("sklearn")

NUM, HOLDOUT, SEED = 160, 80, 3  # 80 training images: one step of batch 64
TINY = ["--num-samples", str(NUM), "--epochs", "1", "--batch-size", "64", "--holdout", str(HOLDOUT), "--seed",
        str(SEED), "--device", "cpu", "--backend", "reference", "--quiet"]


def main(argv: list[str]) -> int:
    """``genfast example latent-map ARGV``: its exit code."""
    return genfast_main(["example", "latent-map", *argv])


@pytest.fixture(scope="module")
def out(tmp_path_factory):
    out = tmp_path_factory.mktemp("latent_map")
    assert main([*TINY, "--out", str(out)]) == 0
    return out


def _png(path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_writes_the_figures_and_keeps_the_run_in_a_subfolder(out):
    assert sorted(p.name for p in out.iterdir()) == sorted([*latent_map.FILES, latent_map.RUN])
    assert (out / "run" / "checkpoint.pt").is_file() and (out / "run" / "metrics.csv").is_file()
    # 28×28 images, 2-pixel padding: 15×15 grid at scale 1, 8 interpolation frames at scale 2
    assert _png(out / "latent_grid.png") == (15 * 30 + 2, 15 * 30 + 2)
    assert _png(out / "interpolation_1_to_7.png") == (8 * 58 + 2, 58 + 2)
    width, height = _png(out / "latent_means.png")
    assert width > 400 and height > 400


def test_json_numbers_are_finite_and_consistent(out):
    summary = json.loads((out / "latent_map.json").read_text())
    m = summary["measured"]
    assert all(math.isfinite(m[k]) for k in ("kl", "bce", "floor", "excess", "negative_elbo"))
    assert m["evaluated_on"] == "held-out" and m["images"] == HOLDOUT and m["pixels"] == 28 * 28
    assert m["kl"] >= 0 and m["floor"] > 0
    # BCE(x, p) − H(x) = KL(Bern(x) ‖ Bern(p)) ≥ 0 for every pixel
    assert m["excess"] == pytest.approx(m["bce"] - m["floor"], rel=1e-9) and m["excess"] > 0
    assert m["negative_elbo"] == pytest.approx(m["bce"] + m["kl"], rel=1e-9)
    assert m["bce_per_pixel"] * m["pixels"] == pytest.approx(m["bce"], rel=1e-9)
    # the floor from its definition on the held-out images: per image Σ_i −x ln x − (1 − x) ln(1 − x)
    dataset = load_dataset("digits", image_size=28, num_samples=NUM, seed=SEED)
    x = torch.stack([dataset[i] for i in split_indices(NUM, HOLDOUT, SEED)[1]]).double()
    entropy = -(x * x.clamp_min(1e-300).log() + (1 - x) * (1 - x).clamp_min(1e-300).log())
    assert m["floor"] == pytest.approx(entropy.flatten(1).sum(1).mean().item(), rel=1e-6)
    t = summary["training"]
    assert t["steps"] == 1 and t["latent_dim"] == 2 and 0 < t["seconds"] <= t["total_seconds"]
    assert summary["machine"]["torch_threads"] == torch.get_num_threads()
    assert summary["machine"]["backend"] == "reference"
    labels = digit_labels(num_samples=NUM, seed=SEED)
    assert {c: labels[i].item() for c, i in summary["representatives"].items()} == {"1": 1, "7": 7}


def test_report_states_the_measured_numbers(out):
    report = (out / "latent_map.md").read_text()
    m = json.loads((out / "latent_map.json").read_text())["measured"]
    for key in ("kl", "bce", "floor", "excess", "negative_elbo"):
        assert f"| {m[key]:.2f} |" in report, key
    assert f"{m['bce_per_pixel']:.4f}" in report and f"{m['floor_per_pixel']:.4f}" in report
    assert f"{HOLDOUT} held-out images" in report
    assert f"{15 / m['pixels']:.4f} nats per pixel" in report
    assert "(literature, not measured)" in report
    for picture in ("latent_means.png", "latent_grid.png", "interpolation_1_to_7.png"):
        assert f"]({picture})" in report


def test_representatives_are_the_class_medoids():
    # class 1: a cluster of four near 0 and a sparse tail; the mean (3.4, 0.1) is nearest the tail's (4, 0),
    # the medoid is in the cluster: (0.2, 0) has the least summed distance to the others
    ones = [[0.0, 0.0], [0.2, 0.0], [0.1, 0.1], [0.0, 0.2], [4.0, 0.0], [10.0, 0.0], [10.0, 0.5]]
    sevens = [[9.0, 9.0], [5.0, 5.0], [10.0, 10.0]]
    mu = torch.tensor(ones + sevens)
    labels = torch.tensor([1] * len(ones) + [7] * len(sevens))
    assert latent_map.representatives(mu, labels) == {1: 1, 7: len(ones)}
    with pytest.raises(UsageError, match="the images hold no 3"):
        latent_map.representatives(mu, labels, classes=(3,))


def test_decode_grid_walks_the_normal_quantiles():
    class Identity(torch.nn.Module):  # "decodes" z into a 1×1×2 image holding z itself
        def __init__(self):
            super().__init__()
            self.weight = torch.nn.Parameter(torch.zeros(1))

        def decode(self, z):
            return z[:, None, None, :]

    z = latent_map.decode_grid(Identity(), size=3).view(3, 3, 2)
    q = torch.distributions.Normal(0.0, 1.0).icdf(torch.tensor([1 / 6, 3 / 6, 5 / 6]))
    assert torch.allclose(z[0, :, 0], q) and torch.allclose(z[:, 0, 1], q.flip(0))  # z₁ right, z₂ up


def test_a_file_as_out_is_a_usage_error(tmp_path, capsys):
    target = tmp_path / "file"
    target.write_text("x")
    assert main([*TINY, "--out", str(target)]) == 2
    assert re.search(r"--out .*file is a file, not a folder", capsys.readouterr().err)
    with pytest.raises(UsageError, match="is a file"):
        latent_map.run(type("Args", (), {"out": str(target)})())


@pytest.mark.parametrize("flags, message", [
    (["--epochs", "0"], "--epochs: expected a positive int, got '0'"),
    (["--seed", "-1"], "--seed: expected an integer in"),
    (["--image-size", "30"], "--image-size: invalid choice"),
    (["--holdout", str(NUM)], f"--holdout must be in [0, {NUM})"),
    (["--num-samples", "0"], "--num-samples: expected a positive int, got '0'"),
])
def test_bad_flags_name_the_flag(tmp_path, capsys, flags, message):
    assert main([*TINY, *flags, "--out", str(tmp_path / "o")]) == 2
    assert message in capsys.readouterr().err
