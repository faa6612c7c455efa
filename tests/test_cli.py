"""The genfast command: each subcommand's files, and one-line errors with exit code 2 for bad flags and paths."""
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

from genfast import _backend
from genfast._backend import BACKENDS, why_not
from genfast.cli import main
from genfast.training import read_metrics

DATA = ["--num-samples", "40", "--image-size", "32", "--batch-size", "8", "--backend", "reference",
        "--device", "cpu", "--quiet"]
VAE = ["--latent-dim", "4", "--base-channels", "8"]


def _png(path: Path) -> tuple[int, int]:
    with Image.open(path) as image:
        assert image.format == "PNG"
        return image.size


def test_train_vae_writes_its_files(tmp_path):
    assert main(["train", "vae", *DATA, *VAE, "--max-steps", "2", "--out", str(tmp_path)]) == 0
    rows = read_metrics(tmp_path / "metrics.csv")
    assert list(rows[0]) == ["step", "epoch", "loss", "recon", "kl", "images_per_s"]
    assert [row["step"] for row in rows] == [1, 2]
    # 32×32 images at scale 2 with 2-pixel padding: 8 columns of inputs over reconstructions, 4×4 samples,
    # 4 rows of 8 interpolation steps
    assert _png(tmp_path / "reconstructions.png")[1] == 2 * (64 + 2) + 2
    assert _png(tmp_path / "samples.png") == (4 * 66 + 2, 4 * 66 + 2)
    assert _png(tmp_path / "interpolation.png") == (8 * 66 + 2, 4 * 66 + 2)
    _png(tmp_path / "loss.png")
    assert (tmp_path / "checkpoint.pt").is_file()


def test_train_wgan_writes_its_files(tmp_path):
    assert main(["train", "wgan", *DATA, "--latent-dim", "8", "--base-channels", "8", "--n-critic", "2",
                 "--max-steps", "4", "--out", str(tmp_path)]) == 0
    rows = read_metrics(tmp_path / "metrics.csv")
    assert list(rows[0]) == ["step", "epoch", "critic_loss", "penalty", "wasserstein", "generator_loss",
                             "images_per_s"]
    # the generator is updated every --n-critic steps
    assert [row["generator_loss"] is not None for row in rows] == [False, True, False, True]
    # a penalty weight·mean(‖∇D‖ − 1)² is ≥ 0 by construction: > 0 says it was computed, finite that it is no NaN
    assert all(0 < row["penalty"] < float("inf") for row in rows)
    assert _png(tmp_path / "samples.png") == (8 * 66 + 2, 8 * 66 + 2)
    _png(tmp_path / "loss.png")


def test_train_ddpm_and_sample(tmp_path):
    run = tmp_path / "run"
    assert main(["train", "ddpm", *DATA, "--base-channels", "32", "--channel-mult", "1", "2", "--num-res-blocks",
                 "1", "--timesteps", "10", "--sample-steps", "2", "--max-steps", "2", "--out", str(run)]) == 0
    assert [row["step"] for row in read_metrics(run / "metrics.csv")] == [1, 2]
    assert _png(run / "samples.png") == (4 * 66 + 2, 4 * 66 + 2)
    _png(run / "loss.png")
    for sampler, steps, x0 in (("ddim", "3", []), ("ddpm", "10", ["--no-clip-sample"]),
                               ("ddim", "2", ["--thresholding", "--dynamic-thresholding-ratio", "0.9"])):
        out = tmp_path / f"{sampler}{len(x0)}"
        assert main(["sample", "ddpm", "--checkpoint", str(run / "checkpoint.pt"), "--sampler", sampler,
                     "--steps", steps, "--num", "3", "--out", str(out), "--backend", "reference", "--device", "cpu",
                     "--quiet", *x0]) == 0
        assert _png(out / "samples.png") == (2 * 66 + 2, 2 * 66 + 2)


def test_sample_draws_with_the_runs_x0_settings_unless_told_otherwise(tmp_path, monkeypatch):
    """`sample ddpm` passes the run's saved x̂₀ settings (diffusers' default: clipped) to DDPM.sample, and the flags
    replace them."""
    from genfast.models import DDPM

    run = tmp_path / "run"
    assert main(["train", "ddpm", *DATA, "--base-channels", "32", "--channel-mult", "1", "2", "--num-res-blocks",
                 "1", "--timesteps", "10", "--sample-steps", "2", "--max-steps", "1", "--no-clip-sample",
                 "--out", str(run)]) == 0
    calls = []
    sample = DDPM.sample

    def spy(self, n, **kwargs):
        calls.append({k: kwargs[k] for k in ("clip_sample", "thresholding", "dynamic_thresholding_ratio",
                                             "sample_max_value")})
        return sample(self, n, **kwargs)

    monkeypatch.setattr(DDPM, "sample", spy)
    common = ["sample", "ddpm", "--checkpoint", str(run / "checkpoint.pt"), "--steps", "2", "--num", "2", "--out",
              str(tmp_path / "s"), "--backend", "reference", "--device", "cpu", "--quiet"]
    assert main(common) == 0
    assert main([*common, "--clip-sample", "--sample-max-value", "1.5"]) == 0
    assert calls == [dict(clip_sample=False, thresholding=False, dynamic_thresholding_ratio=0.995,
                          sample_max_value=1.0),
                     dict(clip_sample=True, thresholding=False, dynamic_thresholding_ratio=0.995,
                          sample_max_value=1.5)]


def test_compare_beta_writes_the_report(tmp_path):
    assert main(["compare-beta", "--betas", "1", "4", *DATA, *VAE, "--holdout", "16", "--max-steps", "2",
                 "--out", str(tmp_path)]) == 0
    report = (tmp_path / "report.md").read_text()
    for beta in ("1", "4"):
        assert (tmp_path / f"beta_{beta}" / "samples.png").is_file()
        assert f"| {beta} | " in report
    assert "β=4's excess over the data's floor is " in report and "| floor |" in report and "Σ_i H(x_i)" in report
    assert "one seed" in report and " ± " not in report  # --seeds defaults to 1: single values, no spread
    assert "MIG" in report and "## Which latent carries each factor" in report  # faces know their factors
    for name in ("reconstructions_by_beta.png", "interpolation_by_beta.png", "samples_by_beta.png"):
        _png(tmp_path / name)


def _backend_lines(out: str) -> dict[str, str]:
    """{backend: status} from the "backends on <device>:" block of ``genfast info``."""
    lines = out.splitlines()
    start = next(i for i, line in enumerate(lines) if line.startswith("backends on "))
    rows = [line.split(maxsplit=1) for line in lines[start + 1:] if line.startswith("  ")]
    return {name: status for name, status in rows}


def test_info_lists_every_backend(capsys):
    assert main(["info"]) == 0
    out = capsys.readouterr().out
    for word in ("genfast", "torch", "triton", "python", "device"):
        assert word in out
    device = "cuda" if torch.cuda.is_available() else "cpu"
    assert f"backends on {device}:" in out
    statuses = _backend_lines(out)
    assert list(statuses) == list(BACKENDS)
    for name, status in statuses.items():  # what the backend table says
        reason = why_not(name, device)
        assert status == ("available" if reason is None else f"unavailable: {reason}"), name
    # under the test set-up (TRITON_INTERPRET=1) the interpreter runs every op on the CPU (where it runs here)
    for name in ("auto", "reference", "torch") + (("triton",) if why_not("triton", device) is None else ()):
        assert statuses[name] == "available"


def test_info_says_which_ops_a_backend_runs_and_why(capsys, monkeypatch):
    """A backend that runs some ops only: "available for X only (the reason for the first missing op)"; one that
    runs none: "unavailable: reason"."""
    def table(name, device="cpu", dtype=None, op=None):
        if name == "cpp" and op in (None, "diffusion", "gradient_penalty"):
            return f"no {op} here"
        return "broken" if name == "triton" else None

    monkeypatch.setattr(_backend, "why_not", table)
    assert main(["info"]) == 0
    statuses = _backend_lines(capsys.readouterr().out)
    assert statuses["cpp"] == "available for group_norm_silu, reparameterize only (no diffusion here)"
    assert statuses["triton"] == "unavailable: broken"
    assert statuses["reference"] == statuses["torch"] == "available"


@pytest.mark.parametrize("argv, expected", [
    (["train", "vae", "--out", "x", "--max-steps", "0"], "--max-steps: expected a positive int"),
    (["train", "vae", "--out", "x", "--dataset", "imagenet"], "--dataset: invalid choice"),
    (["train", "vae", "--max-steps", "1"], "the following arguments are required: --out"),
    (["train", "gan", "--out", "x"], "invalid choice"),
    (["train", "vae", "--out", "x", "--device", "tpu"], "--device must be auto, cpu, cuda or cuda:N"),
    (["train", "vae", "--out", "x", "--dataset", "folder", "--data-dir", "/no/such/folder"], "/no/such/folder"),
    (["train", "vae", "--out", "{tmp}/empty", "--resume"], "--resume: no checkpoint at"),
    (["sample", "ddpm", "--checkpoint", "{tmp}/missing.pt", "--out", "x"], "no checkpoint at"),
    (["compare-beta", "--betas", "1", "--out", "x"], "--betas needs at least two different values"),
    (["compare-beta", "--out", "x", "--seeds", "0"], "argument --seeds: expected a positive int"),
    (["train", "ldm", "--out", "{tmp}/ldm"], "--vae is required: the checkpoint.pt of a VAE trained with --latent-channels"),
    (["train", "vae", "--out", "x", "--latent-channels", "0"], "argument --latent-channels: expected a positive int"),
    (["sample", "ldm", "--checkpoint", "{tmp}/missing.pt", "--out", "x"], "no checkpoint at"),
    (["train", "vae", "--out", "x", "--precision", "fp8"], "argument --precision: invalid choice: 'fp8'"),
    (["train", "ddpm", "--out", "x", "--ema", "1"], "argument --ema: expected a decay in [0, 1)"),
    (["train", "vae", "--out", "x", "--compile", "nosuch"], "argument --compile: expected a torch.compile backend"),
    (["train", "wgan", "--out", "x", "--eval-every", "-1"], "argument --eval-every: expected an integer >= 0"),
    (["train", "vae", "--out", "x", "--eval-num", "3"], "argument --eval-num: expected an integer >= 4"),
    (["eval", "--checkpoint", "{tmp}/missing.pt", "--out", "x"], "--checkpoint: no checkpoint at"),
    (["eval", "--checkpoint", "x.pt", "--out", "x", "--num", "1"], "argument --num: expected an integer >= 4"),
    (["eval", "--checkpoint", "x.pt", "--out", ""], "--out must name a folder"),
    (["train", "ddpm", "--out", "x", "--prediction-type", "x0"], "argument --prediction-type: invalid choice: 'x0'"),
    (["train", "ldm", "--out", "x", "--prediction-type", "v"], "argument --prediction-type: invalid choice: 'v'"),
    (["train", "ddpm", "--out", "x", "--lr-warmup", "-1"], "argument --lr-warmup: expected an integer >= 0"),
    (["train", "vae", "--out", "x", "--lr-warmup", "1.5"], "argument --lr-warmup: expected an integer >= 0"),
    (["train", "ddpm", "--out", "x", "--grad-clip", "nan"], "argument --grad-clip: expected a finite number >= 0"),
    (["train", "wgan", "--out", "x", "--grad-clip", "-1"], "argument --grad-clip: expected a finite number >= 0"),
    (["train", "ddpm", "--out", "{tmp}/g", "--base-channels", "32", "--num-groups", "5"],
     "--num-groups 5 must divide the channels of every U-Net level [32, 64]"),
    (["train", "ddpm", "--out", "x", "--num-groups", "0"], "argument --num-groups: expected a positive int"),
    (["sample", "ddpm", "--checkpoint", "x.pt", "--out", "x", "--dynamic-thresholding-ratio", "1.5"],
     "argument --dynamic-thresholding-ratio: expected a quantile in (0, 1]"),
    (["eval", "--checkpoint", "x.pt", "--out", "x", "--sample-max-value", "0.5"],
     "argument --sample-max-value: expected a finite number >= 1"),
])
def test_bad_flags_and_paths_give_one_line_and_exit_code_2(argv, expected, tmp_path, capsys):
    argv = [arg.replace("{tmp}", str(tmp_path)) for arg in argv]
    assert main(argv) == 2
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("genfast ") and expected in err, err


def test_console_script_runs():
    script = Path(sys.executable).parent / "genfast"
    result = subprocess.run([str(script), "--help"], capture_output=True, text=True, timeout=60)
    assert result.returncode == 0
    for command in ("train", "compare-beta", "compare-families", "sample", "eval", "example", "info", "bench"):
        assert command in result.stdout
