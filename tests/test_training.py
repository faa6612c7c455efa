"""The training loop: resume equivalence, NaN stop, Ctrl-C checkpoint, atomic writes."""
import os
import signal
import subprocess
import sys
import time

import pytest
import torch

from genfast.checkpoint import atomic_write, load_checkpoint, save_checkpoint
from genfast.cli import main
from genfast.training import read_metrics

TINY = ["--num-samples", "48", "--image-size", "32", "--latent-dim", "4", "--base-channels", "8",
        "--batch-size", "8", "--backend", "reference", "--device", "cpu", "--quiet"]


def _vae(out, *extra):
    return main(["train", "vae", *TINY, "--out", str(out), *extra])


def _without_timing(rows):
    return [{k: v for k, v in row.items() if k != "images_per_s"} for row in rows]


def test_resume_matches_an_uninterrupted_run(tmp_path):
    # 6 steps of batch 8 over 48 images cross an epoch boundary (5 steps an epoch), so the data order is resumed
    # mid-epoch and then re-drawn for the next epoch.
    assert _vae(tmp_path / "straight", "--max-steps", "6") == 0
    assert _vae(tmp_path / "split", "--max-steps", "3") == 0
    assert load_checkpoint(tmp_path / "split" / "checkpoint.pt")["step"] == 3
    assert _vae(tmp_path / "split", "--max-steps", "6", "--resume") == 0
    straight = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    split = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert split["step"] == straight["step"] == 6 and split["epoch"] == straight["epoch"] == 1
    for name, value in straight["task"]["modules"]["model"].items():
        assert torch.equal(value, split["task"]["modules"]["model"][name]), name
    rows = _without_timing(read_metrics(tmp_path / "straight" / "metrics.csv"))
    assert [row["step"] for row in rows] == [1, 2, 3, 4, 5, 6]
    assert rows == _without_timing(read_metrics(tmp_path / "split" / "metrics.csv"))


def test_nan_loss_stops_and_keeps_the_last_good_checkpoint(tmp_path, monkeypatch, capsys):
    from genfast.models import ConvVAE

    loss = ConvVAE.loss
    calls = []

    def poisoned(self, x, **kwargs):
        calls.append(1)
        losses = loss(self, x, **kwargs)
        if len(calls) == 3:
            losses["loss"] = losses["loss"] * float("nan")
        return losses

    monkeypatch.setattr(ConvVAE, "loss", poisoned)
    assert _vae(tmp_path, "--max-steps", "6", "--checkpoint-every", "2") == 1
    message = capsys.readouterr().err.strip()
    assert "nan" in message and "at step 3" in message and str(tmp_path / "checkpoint.pt") in message
    assert len(message.splitlines()) == 1
    saved = load_checkpoint(tmp_path / "checkpoint.pt")
    assert saved["step"] == 2
    assert all(torch.isfinite(v).all() for v in saved["task"]["modules"]["model"].values() if v.is_floating_point())
    assert [row["step"] for row in read_metrics(tmp_path / "metrics.csv")] == [1, 2]


def test_atomic_write_leaves_the_old_file_on_failure(tmp_path):
    path = tmp_path / "checkpoint.pt"
    save_checkpoint({"step": 1}, path)

    def fail(tmp):
        with open(tmp, "wb") as f:
            f.write(b"partial")
        raise OSError("disk full")

    with pytest.raises(OSError, match="disk full"):
        atomic_write(path, fail)
    assert load_checkpoint(path) == {"step": 1}
    assert os.listdir(tmp_path) == ["checkpoint.pt"]


@pytest.mark.parametrize("signum, code", [(signal.SIGINT, 130), (signal.SIGTERM, 143)], ids=["SIGINT", "SIGTERM"])
def test_a_signal_saves_a_checkpoint_after_the_step(tmp_path, signum, code):
    """Ctrl-C (SIGINT) and SIGTERM (schedulers, docker stop, torchrun's shutdown): the step finishes, a checkpoint
    is saved, one line says so and the exit code is 128 + the signal."""
    out = tmp_path / "run"
    env = dict(os.environ, GENFAST_BACKEND="reference")
    process = subprocess.Popen([sys.executable, "-m", "genfast", "train", "vae", *TINY, "--out", str(out),
                                "--epochs", "100000", "--checkpoint-every", "1"],
                               stderr=subprocess.PIPE, text=True, env=env)
    try:
        deadline = time.monotonic() + 60
        while not (out / "checkpoint.pt").exists():  # training has started once the first checkpoint is there
            assert process.poll() is None and time.monotonic() < deadline, "training did not start"
            time.sleep(0.05)
        process.send_signal(signum)
        _, err = process.communicate(timeout=60)
    finally:
        process.kill()
    assert process.returncode == code, err
    assert f"checkpoint saved to {out / 'checkpoint.pt'}" in err and "Traceback" not in err
    saved = load_checkpoint(out / "checkpoint.pt")
    assert saved["step"] >= 1
    assert [row["step"] for row in read_metrics(out / "metrics.csv")][-1] == saved["step"]
