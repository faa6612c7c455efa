"""Latent diffusion: the spatial-latent VAE, the LatentDiffusion model, `genfast train/sample/eval ldm`, and the
wall-clock budget of a run (--max-seconds)."""
import json

import pytest
import torch

import genfast
from genfast.checkpoint import load_checkpoint
from genfast.cli import main
from genfast.models import DDPM, ConvVAE, LatentDiffusion, UNet
from genfast.training import read_metrics

from evaluation_fixtures import tiny_feature_net  # noqa: F401 (a fixture)

ANY_SIZE = ["--num-samples", "32", "--batch-size", "8", "--backend", "reference", "--device", "cpu", "--quiet"]
DATA = [*ANY_SIZE, "--image-size", "32"]
UNET = ["--base-channels", "32", "--channel-mult", "1", "2", "--num-res-blocks", "1", "--timesteps", "10",
        "--sample-steps", "2"]


@pytest.mark.parametrize("size, latent", [(64, (4, 16, 16)), (32, (4, 8, 8)), (28, (4, 7, 7))])
def test_spatial_vae_has_an_f4_latent(size, latent):
    vae = ConvVAE(image_size=size, latent_channels=4, base_channels=8)
    x = torch.rand(2, 3, size, size)
    mu, logvar = vae.encode(x)
    assert vae.latent_shape == latent and mu.shape == logvar.shape == (2, *latent)
    assert vae.latent_dim == 4 * latent[1] * latent[2]
    assert vae.decode(mu).shape == x.shape and vae.sample(3).shape == (3, 3, size, size)
    assert vae.interpolate(x, x.flip(0), steps=3).shape == (2, 3, 3, size, size)
    losses = vae.loss(x, generator=torch.Generator().manual_seed(0))
    losses["loss"].backward()
    assert losses["kl"] > 0 and all(p.grad is not None for p in vae.parameters())
    with pytest.raises(ValueError, match=r"z must be a tensor of shape \(B, 4, "):
        vae.decode(torch.zeros(2, vae.latent_dim))
    with pytest.raises(ValueError, match="latent_channels must be a positive int"):
        ConvVAE(image_size=size, latent_channels=0)


def _ldm(size=32):
    vae = ConvVAE(image_size=size, latent_channels=4, base_channels=8)
    unet = UNet(image_size=size // 4, in_channels=4, base_channels=32, channel_mult=(1, 2), num_res_blocks=1,
                attention_resolutions=())
    return LatentDiffusion(vae=vae, ddpm=DDPM(unet=unet, schedule=genfast.NoiseSchedule.linear(20)))


def test_latent_diffusion_scales_trains_only_the_unet_and_decodes():
    torch.manual_seed(0)
    model = _ldm()
    images = torch.rand(16, 3, 32, 32)
    scale = model.measure_scale(images, generator=torch.Generator().manual_seed(1), batch_size=5)
    again = torch.Generator().manual_seed(1)
    z = torch.cat([model.encode(chunk, generator=again) for chunk in images.split(5)])  # the same draws
    assert float(model.latent_scale) == pytest.approx(scale, rel=1e-6)
    assert float(z.double().std()) == pytest.approx(1, rel=1e-5)
    model.train()
    assert not model.vae.training  # frozen, even in a training model
    model.loss(images, generator=torch.Generator().manual_seed(2)).backward()
    assert all(p.grad is None for p in model.vae.parameters())
    assert all(p.grad is not None for p in model.ddpm.parameters())
    x_t = torch.randn(2, 4, 8, 8) * 3
    first = model.sample(2, sampler="ddim", steps=3, noise=x_t)
    assert first.shape == (2, 3, 32, 32) and 0 <= first.min() and first.max() <= 1
    assert torch.equal(first, model.sample(2, sampler="ddim", steps=3, noise=x_t))  # x_T → image is deterministic
    latents = model.ddpm.sample(2, sampler="ddim", steps=3, noise=x_t, clip_sample=False)
    assert latents.abs().max() > 1  # latents are not clipped to the image range (as Stable Diffusion's)
    assert torch.equal(first, model.decode(latents))


def test_latent_diffusion_refuses_a_flat_vae_or_a_mismatched_unet():
    unet = UNet(image_size=8, in_channels=4, base_channels=32, channel_mult=(1,), num_res_blocks=1)
    with pytest.raises(ValueError, match="spatial latent"):
        LatentDiffusion(vae=ConvVAE(image_size=32), ddpm=DDPM(unet=unet))
    with pytest.raises(ValueError, match="the VAE's latent is 4×16×16"):
        LatentDiffusion(vae=ConvVAE(image_size=64, latent_channels=4), ddpm=DDPM(unet=unet))
    with pytest.raises(ValueError, match="noise must hold n = 3"):
        DDPM(unet=unet).sample(3, noise=torch.zeros(2, 4, 8, 8))


def _spatial_vae(out):
    assert main(["train", "vae", *DATA, "--base-channels", "8", "--latent-channels", "4", "--max-steps", "2",
                 "--out", str(out)]) == 0
    return out / "checkpoint.pt"


def _train_ldm(vae, out, *extra):
    return main(["train", "ldm", *DATA, *UNET, "--vae", str(vae), "--out", str(out), *extra])


def test_train_ldm_resumes_exactly_samples_and_evaluates(tmp_path, tiny_feature_net):
    vae = _spatial_vae(tmp_path / "vae")
    assert _train_ldm(vae, tmp_path / "straight", "--max-steps", "4") == 0
    assert _train_ldm(vae, tmp_path / "split", "--max-steps", "2") == 0
    assert main(["train", "ldm", *DATA, "--vae", str(vae), "--out", str(tmp_path / "split"), "--max-steps", "4",
                 "--resume"]) == 0
    straight = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    split = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    weights = straight["task"]["modules"]["model"]
    for name, value in weights.items():
        assert torch.equal(value, split["task"]["modules"]["model"][name]), name
    assert [r["loss"] for r in read_metrics(tmp_path / "straight" / "metrics.csv")] == \
        [r["loss"] for r in read_metrics(tmp_path / "split" / "metrics.csv")]
    # the frozen VAE is the --vae checkpoint's, inside the LDM's own checkpoint; the scale was measured
    vae_weights = load_checkpoint(vae)["task"]["modules"]["model"]
    assert all(torch.equal(weights[f"vae.{k}"], v) for k, v in vae_weights.items())
    assert weights["latent_scale"] > 0 and weights["latent_scale"] != 1
    assert straight["config"]["vae_model"]["config"]["latent_channels"] == 4
    vae.unlink()  # sampling and evaluating need only the LDM's checkpoint
    assert main(["sample", "ldm", "--checkpoint", str(tmp_path / "straight" / "checkpoint.pt"), "--steps", "3",
                 "--num", "2", "--out", str(tmp_path / "samples"), "--backend", "reference", "--device", "cpu",
                 "--quiet"]) == 0
    assert (tmp_path / "samples" / "samples.png").is_file()
    assert main(["eval", "--checkpoint", str(tmp_path / "straight" / "checkpoint.pt"), "--num", "8", "--out",
                 str(tmp_path / "eval"), "--backend", "reference", "--device", "cpu", "--quiet"]) == 0
    result = json.loads((tmp_path / "eval" / "eval.json").read_text())
    assert result["run"]["sampling"]["clip_sample"] is False  # latents are never clipped
    assert straight["config"]["clip_sample"] is False and straight["config"]["lr_warmup"] == 500


def test_latent_diffusion_refuses_to_clip_its_latents(tmp_path, capsys):
    """Latent diffusion does not clip x̂₀ (as Stable Diffusion): `train ldm` and `sample ldm` have no x̂₀ flags,
    `eval` refuses them for an ldm checkpoint, and so does the Python API."""
    from genfast.training import RunConfig, UsageError

    for argv in (["train", "ldm", "--out", str(tmp_path / "x"), "--clip-sample"],
                 ["sample", "ldm", "--checkpoint", "x.pt", "--out", str(tmp_path / "x"), "--thresholding"]):
        assert main(argv) == 2
        err = capsys.readouterr().err
        assert "unrecognized arguments" in err and err.count("\n") == 1, err
    vae = _spatial_vae(tmp_path / "vae")
    assert _train_ldm(vae, tmp_path / "ldm", "--max-steps", "1") == 0
    assert main(["eval", "--checkpoint", str(tmp_path / "ldm" / "checkpoint.pt"), "--num", "8", "--out",
                 str(tmp_path / "eval"), "--clip-sample", "--quiet"]) == 2
    err = capsys.readouterr().err
    assert "--clip-sample: the x̂₀ settings apply to pixel-space ddpm checkpoints, this is a ldm" in err
    assert err.count("\n") == 1 and not (tmp_path / "eval").exists()
    with pytest.raises(UsageError, match="latent diffusion does not clip"):
        RunConfig(model="ldm", out="x", vae=str(vae), thresholding=True).check()


def test_ldm_errors_are_one_line(tmp_path, capsys):
    flat = tmp_path / "flat"
    assert main(["train", "vae", *DATA, "--base-channels", "8", "--latent-dim", "4", "--max-steps", "1", "--out",
                 str(flat)]) == 0
    cases = [(["--vae", str(flat / "checkpoint.pt")], "is a flat-latent vae checkpoint"),
             (["--vae", str(tmp_path / "missing.pt")], "--vae"),
             (["--vae", str(_spatial_vae(tmp_path / "vae")), "--image-size", "64"], "is for 32×32 images")]
    for flags, message in cases:
        capsys.readouterr()
        assert main(["train", "ldm", *(ANY_SIZE if "--image-size" in flags else DATA), *UNET, *flags, "--out", str(tmp_path / "ldm")]) == 2
        err = capsys.readouterr().err
        assert message in err and err.count("\n") == 1, err
    assert main(["sample", "ldm", "--checkpoint", str(flat / "checkpoint.pt"), "--out", str(tmp_path / "s"),
                 "--quiet"]) == 2
    assert "is a vae checkpoint, not ldm" in capsys.readouterr().err


def test_max_seconds_stops_a_run_with_a_checkpoint(tmp_path, capsys):
    out = tmp_path / "run"
    assert main(["train", "vae", *DATA, "--base-channels", "8", "--latent-dim", "4", "--max-steps", "100000",
                 "--max-seconds", "0.5", "--out", str(out)]) == 0
    steps = load_checkpoint(out / "checkpoint.pt")["step"]
    assert 1 <= steps < 100000 and len(read_metrics(out / "metrics.csv")) == steps
    assert main(["train", "vae", *DATA, "--max-seconds", "0", "--out", str(tmp_path / "x")]) == 2
    assert "--max-seconds: expected a finite number of seconds > 0" in capsys.readouterr().err


def test_flat_vae_keeps_its_parameter_order():
    """An optimiser's saved state is matched to parameters by position, so the flat VAE's order (encoder, posterior
    head, latent projection, decoder) is that of the checkpoints written before the spatial form existed."""
    names = [name.split(".")[0] for name, _ in ConvVAE(image_size=32, base_channels=8).named_parameters()]
    order = list(dict.fromkeys(names))
    assert order == ["encoder", "to_posterior", "from_latent", "decoder"]
