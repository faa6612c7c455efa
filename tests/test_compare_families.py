"""genfast compare-families: the controllability measure on latents whose answer is known, the report's sentences
computed from the numbers, flag checking, and tiny end-to-end runs (faces; a data set without factors)."""
import argparse
import json

import pytest
import torch
from evaluation_fixtures import tiny_feature_net  # noqa: F401  (fixture)
from torch import nn

from genfast import compare_families as cf
from genfast.controllability import Latent, controllability, ridge_directions, slopes
from genfast.families_report import findings
from genfast.training import UsageError


class ExactFactors(nn.Module):
    """A factor 'predictor' that reads the five factors off the first five pixels: an exact judge."""

    def __init__(self):
        super().__init__()
        self.dummy = nn.Parameter(torch.zeros(()))

    def predict_factors(self, images):
        return images.flatten(1)[:, :5]


def linear_latent(mix: torch.Tensor) -> Latent:
    """z (5 dims) → 'images' whose factors are 0.5 + 0.05·mix·z (inside [0, 1] for |z| ≲ 3)."""
    def decode(z):
        return (0.5 + 0.05 * z @ mix.T).view(-1, 1, 1, 5)
    return Latent("linear", (5,), lambda n, g: torch.randn(n, 5, generator=g), decode, "test")


def measure(mix):
    return controllability(linear_latent(mix), ExactFactors(), generator=torch.Generator().manual_seed(0),
                           fit_num=64, num_random=2, starts=3)


def test_slopes_and_ridge_directions_recover_a_linear_map():
    a = torch.tensor([-2.0, -1.0, 0.0, 1.0, 2.0])
    values = torch.stack([0.3 * a, -0.1 * a + 5, torch.zeros(5)], dim=-1)[None].repeat(4, 1, 1)
    assert torch.allclose(slopes(a, values), torch.tensor([0.3, -0.1, 0.0]), atol=1e-6)
    z = torch.randn(200, 10, generator=torch.Generator().manual_seed(1))
    w = torch.zeros(10, 2)
    w[3, 0], w[7, 1] = 2.0, -1.0
    d = ridge_directions(z, z @ w)
    assert torch.allclose(d[0].abs(), torch.nn.functional.one_hot(torch.tensor(3), 10).float(), atol=0.02)
    assert d[1][7] < -0.99  # the sign follows the factor


def test_a_disentangled_latent_scores_one_and_an_entangled_one_less():
    clean = measure(torch.eye(5))
    assert clean["cleanliness"] == pytest.approx(1.0, abs=0.01)  # ridge + 64 samples: nearly the axis
    assert clean["response"] == pytest.approx(0.05, rel=0.01)  # 0.05 per prior s.d.
    assert clean["control"] == pytest.approx(0.05, rel=0.02)
    mix = torch.eye(5) + 0.5  # every latent axis moves every factor
    mixed = measure(mix)
    # the found direction for f is ∝ row f of mix: factor g moves by 0.05·mix_g·mix_f/|mix_f|
    rows = mix / mix.norm(dim=1, keepdim=True)
    s = 0.05 * mix @ rows.T  # s[g, f]
    expected = (s.diagonal().abs() / s.abs().sum(0)).mean()
    assert mixed["cleanliness"] == pytest.approx(float(expected), abs=0.02)
    assert mixed["cleanliness"] < clean["cleanliness"] - 0.3
    assert mixed["traversals"].shape == (5 + 2, 5, 1, 1, 5)


def test_a_latent_the_images_ignore_has_no_control():
    null = measure(torch.zeros(5, 5))
    assert null["control"] == 0.0 and null["response"] == 0.0 and null["random_strength"] == 0.0


def result(fid, recall, ms, control, pd=5.0):
    return dict(quality=dict(fid=fid, kid=0.1, kid_std=0.01, precision=0.5, recall=recall), pairwise_distance=pd,
                speed=dict(ms_per_image=ms, images_per_s=1000 / ms),
                training=dict(seconds=10, steps=5, stages=[dict(steps=5, seconds=10)]),
                control=[dict(control=control, cleanliness=0.5, response=0.1, dims=3072 if ms > 100 else 256,
                              random_strength=0.01, random_cleanliness=0.4)])


META = dict(faces=True, real_pairwise_distance=10.0, reference="ref",
            settings=dict(sample_steps=10, image_size=32, dataset="faces"))


def test_findings_follow_the_numbers():
    textbook = dict(vae=result(60, 0.5, 1.0, 0.04), wgan=result(40, 0.1, 1.0, 0.01, pd=2.0),
                    ddpm=result(20, 0.6, 400.0, 0.05), ldm=result(30, 0.5, 50.0, 0.05))
    text = "\n".join(findings(textbook, META))
    assert "GAN recall 0.100" in text and "(mode collapse)*: GAN recall 0.100 vs VAE 0.500, DDPM (pixels) 0.600, " \
        "LDM (latent DDPM) 0.500; lower than 3 of 3" in text
    assert "not the least diverse" not in text and "not yet faces" not in text
    assert "generates 8.0× faster than the pixel DDPM" in text and "12× fewer numbers" in text
    assert "VAE 0.040 > GAN 0.010" in text and "best of VAE/GAN WGAN-GP 40.00: agrees" in text
    noise = dict(textbook, ddpm=dict(result(20, 0.6, 400.0, 0.05), quality=dict(textbook["ddpm"]["quality"],
                                                                                 precision=0.02)))
    assert "DDPM (pixels): its samples are not yet faces** — precision 0.020" in "\n".join(findings(noise, META))
    flipped = dict(textbook, wgan=result(80, 0.9, 1.0, 0.09))
    text = "\n".join(findings(flipped, META))
    assert "GAN FID 80.00 ≥ VAE 60.00" in text and "does not agree" in text
    assert "(not the least diverse)" in text and "VAE 0.040 ≤ GAN 0.090" in text


def parse(argv):
    parser = argparse.ArgumentParser()
    cf.add_arguments(parser)
    args = parser.parse_args(argv)
    args.argv = argv
    return args


def test_bad_flags_name_the_flag(tmp_path):
    with pytest.raises(UsageError, match="--models"):
        cf.settings_from(parse(["--models", "vae", "flow", "--out", str(tmp_path)]))
    with pytest.raises(UsageError, match="--eval-num"):
        cf.settings_from(parse(["--eval-num", "3", "--out", str(tmp_path)]))
    with pytest.raises(SystemExit):  # argparse: mutually exclusive
        parse(["--steps", "3", "--seconds", "4", "--out", str(tmp_path)])
    file = tmp_path / "file"
    file.write_text("x")
    with pytest.raises(UsageError, match="--out"):
        cf.settings_from(parse(["--out", str(file)]))
    defaults = cf.settings_from(parse(["--out", str(tmp_path)]))
    assert defaults.models == cf.MODELS and defaults.seconds == cf.DEFAULT_SECONDS and defaults.steps is None


def test_tiny_run_on_the_faces_writes_report_pictures_and_json(tmp_path, tiny_feature_net):  # noqa: F811
    out = tmp_path / "cmp"
    args = parse(["--models", "vae", "wgan", "--steps", "2", "--eval-num", "16", "--num-samples", "32",
                  "--batch-size", "16", "--latent-dim", "8", "--out", str(out), "--no-checkpoints", "--quiet"])
    assert cf.run(args) == 0
    data = json.loads((out / "families.json").read_text())
    assert list(data["models"]) == ["vae", "wgan"]
    for m in data["models"].values():
        assert m["training"]["steps"] == 2 and m["speed"]["images_per_s"] > 0
        assert 0 <= m["quality"]["recall"] <= 1 and m["quality"]["fid"] >= 0
        assert m["control"][0]["dims"] == 8 and 0 <= m["control"][0]["cleanliness"] <= 1
    report = (out / "report.md").read_text()
    assert "| VAE |" in report and "| WGAN-GP |" in report and "GAN recall" in report
    assert f"{data['models']['vae']['quality']['fid']:.2f}" in report
    assert (out / "samples.png").is_file() and (out / "traversals.png").is_file()
    assert not list(out.glob("*/checkpoint.pt"))


def test_a_dataset_without_factors_says_so(tmp_path, tiny_feature_net):  # noqa: F811
    out = tmp_path / "digits"
    args = parse(["--models", "vae", "--dataset", "digits", "--steps", "1", "--eval-num", "16", "--batch-size", "16",
                  "--out", str(out), "--quiet"])
    assert cf.run(args) == 0
    report = (out / "report.md").read_text()
    assert "not available on `digits`" in report and "cleanliness" not in report
    assert json.loads((out / "families.json").read_text())["models"]["vae"]["control"] == []


def test_the_cli_command_reports_bad_flags_in_one_line(tmp_path, capsys):
    from genfast.cli import main

    assert main(["compare-families", "--models", "vae", "gan", "--out", str(tmp_path)]) == 2
    err = capsys.readouterr().err
    assert "--models must name some of vae, wgan, ddpm, ldm, got vae gan" in err and "Traceback" not in err
    assert main(["compare-families", "--steps", "2", "--seconds", "3", "--out", str(tmp_path)]) == 2
