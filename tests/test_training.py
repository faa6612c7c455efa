"""The training loop: resume equivalence (also of every --precision/--ema/--compile/--channels-last/--eval-every/
--lr-warmup/--grad-clip run, and of a checkpoint written before a setting existed), NaN stop, Ctrl-C checkpoint,
atomic writes, the learning-rate warm-up and the gradient clipping."""
import math
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

from evaluation_fixtures import tiny_feature_net  # noqa: F401 (a fixture)

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


# ---- how a step runs: --precision, --ema, --compile, --channels-last, --eval-every -----------------------------

FLAG_RUNS = {
    # bf16 autocast on the CPU, an EMA without warm-up, NHWC, and sample quality every 2 steps
    "vae-bf16-ema-channels-last-eval": ("vae", ["--base-channels", "8", "--latent-dim", "4", "--precision", "bf16", "--ema", "0.5",
                                                "--no-ema-warmup", "--channels-last", "--eval-every", "2",
                                                "--eval-num", "16"]),
    # bf16, the default EMA (0.9999, warm-up), NHWC (fp16 convolutions are slow on a CPU: fp16 runs on the WGAN),
    # the diffusion recipe's defaults (lr warm-up 500, gradient norm clipped to 1), a v-predicting U-Net
    "ddpm-bf16-default-ema-channels-last-v": ("ddpm", ["--base-channels", "32", "--channel-mult", "1", "2",
                                                       "--num-res-blocks", "1", "--timesteps", "10",
                                                       "--sample-steps", "2", "--precision", "bf16",
                                                       "--channels-last", "--prediction-type", "v_prediction"]),
    # the compiled step (AOTAutograd's graphs, no code generation: fast), fp16 with its loss scalers, a warm-up
    # that ends mid-run and gradients clipped after the scaler unscaled them
    "wgan-fp16-ema-compile-warmup-clip": ("wgan", ["--base-channels", "8", "--latent-dim", "8", "--n-critic", "2",
                                                   "--precision", "fp16", "--ema", "0.9", "--compile", "aot_eager",
                                                   "--lr-warmup", "3", "--grad-clip", "0.05"]),
    "vae-compile": ("vae", ["--base-channels", "8", "--latent-dim", "4", "--compile", "aot_eager"]),
}
FLAGS_DATA = ["--num-samples", "32", "--image-size", "32", "--batch-size", "8",
              "--backend", "reference", "--device", "cpu", "--quiet"]


def _flag_run(model, flags, out, *extra):
    from torch._dynamo.utils import counters

    torch._dynamo.reset()  # every run compiles afresh, as a new process does (and stays under the recompile limit)
    counters.clear()
    code = main(["train", model, *FLAGS_DATA, *flags, "--out", str(out), *extra])
    if "--compile" in flags:  # fullgraph=True: a graph break would have been an error
        assert counters["stats"]["unique_graphs"] >= 1 and not counters["graph_break"]
    return code


def _states_equal(a, b, path=""):
    if isinstance(a, torch.Tensor):
        assert torch.equal(a, b), path
    elif isinstance(a, dict):
        assert a.keys() == b.keys(), path
        for key in a:
            _states_equal(a[key], b[key], f"{path}/{key}")
    elif isinstance(a, (list, tuple)):
        assert len(a) == len(b), path
        for i, (x, y) in enumerate(zip(a, b)):
            _states_equal(x, y, f"{path}/{i}")
    else:
        assert a == b, path


@pytest.mark.parametrize("name", FLAG_RUNS)
def test_every_step_flag_trains_and_resumes_exactly(name, tmp_path, tiny_feature_net):
    """4 steps straight equal 2 steps, then 2 more resumed: weights, optimiser, EMA, loss scaler, the metrics
    (and the sample-quality columns), with the flags taken from the checkpoint."""
    model, flags = FLAG_RUNS[name]
    assert _flag_run(model, flags, tmp_path / "straight", "--max-steps", "4") == 0
    assert _flag_run(model, flags, tmp_path / "split", "--max-steps", "2") == 0
    assert main(["train", model, *FLAGS_DATA, "--out", str(tmp_path / "split"), "--max-steps", "4",
                 "--resume"]) == 0
    straight = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    split = load_checkpoint(tmp_path / "split" / "checkpoint.pt")
    assert straight["step"] == split["step"] == 4
    _states_equal(straight["task"], split["task"])
    for field in ("precision", "ema", "ema_warmup", "compile", "channels_last", "eval_every", "eval_num", "lr_warmup",
                  "grad_clip", "prediction_type", "scale_shift", "num_groups", "clip_sample", "thresholding"):
        assert straight["config"][field] == split["config"][field], field
    rows = _without_timing(read_metrics(tmp_path / "straight" / "metrics.csv"))
    assert rows == _without_timing(read_metrics(tmp_path / "split" / "metrics.csv"))
    assert all(math.isfinite(v) for row in rows for v in row.values() if v is not None)
    config = straight["config"]
    if "--ema" in flags or model == "ddpm":
        ema = next(iter(straight["task"]["ema"].values()))
        assert ema["decay"] == config["ema"] == (0.9999 if model == "ddpm" else float(flags[flags.index("--ema") + 1]))
        assert ema["updates"] == (2 if model == "wgan" else 4)  # the generator steps every --n-critic 2 steps
    else:
        assert config["ema"] == 0.0 and straight["task"]["ema"] == {}
    assert config["precision"] == (flags[flags.index("--precision") + 1] if "--precision" in flags else "fp32")
    assert bool(straight["task"]["scalers"]) == (config["precision"] == "fp16")
    if "--eval-every" in flags:
        assert [row["fid"] is not None for row in rows] == [False, True, False, True]
        assert all(0 <= row["precision"] <= 1 for row in rows if row["fid"] is not None)
    warmup = int(flags[flags.index("--lr-warmup") + 1]) if "--lr-warmup" in flags else (500 if model == "ddpm" else 0)
    assert config["lr_warmup"] == warmup
    assert config["grad_clip"] == (float(flags[flags.index("--grad-clip") + 1]) if "--grad-clip" in flags
                                   else 1.0 if model == "ddpm" else 0.0)
    schedulers = straight["task"]["schedulers"]
    assert sorted(schedulers) == (sorted(straight["task"]["optimizers"]) if warmup else [])
    for name, scheduler in schedulers.items():  # the learning rate after the run's updates (generator: every 2nd)
        updates = 2 if name == "generator" else 4
        lr = straight["task"]["optimizers"][name]["param_groups"][0]["lr"]
        assert scheduler["last_epoch"] == updates
        assert lr == pytest.approx(scheduler["base_lrs"][0] * min(1, (updates + 1) / warmup))
    if model == "ddpm":
        assert config["prediction_type"] == "v_prediction" and config["clip_sample"] is True


def test_ema_is_a_foreach_lerp_with_warm_up_and_copies_buffers():
    from genfast.training.ema import EMA

    model = torch.nn.Sequential(torch.nn.Linear(3, 2), torch.nn.BatchNorm1d(2))
    ema = EMA(model, decay=0.99)
    assert [ema.decay_at(t) for t in (0, 80, 10**6)] == [0.1, 0.9, 0.99]
    assert EMA(model, decay=0.99, warmup=False).decay_at(0) == 0.99
    before = {k: v.clone() for k, v in ema.module.state_dict().items()}
    with torch.no_grad():
        model[0].weight.add_(1.0)
    model(torch.randn(4, 3))  # moves the BatchNorm statistics
    ema.update()
    averaged = ema.module.state_dict()
    assert torch.allclose(averaged["0.weight"], 0.1 * before["0.weight"] + 0.9 * model[0].weight)
    assert torch.equal(averaged["1.running_mean"], model[1].running_mean)
    assert ema.updates == 1 and not any(p.requires_grad for p in ema.module.parameters())
    with pytest.raises(ValueError, match="decay must be in"):
        EMA(model, decay=1.0)


def test_bf16_autocast_runs_the_convolutions_in_bf16_on_the_cpu():
    from genfast.training import RunConfig
    from genfast.training.distributed import World
    from genfast.training.tasks import VAETask

    config = RunConfig(model="vae", out="unused", image_size=32, latent_dim=4, base_channels=8, precision="bf16",
                       ema=0.0, backend="reference")
    task = VAETask(config, channels=3, device=torch.device("cpu"), world=World())
    dtypes = []
    task.model.encoder[0].register_forward_hook(lambda module, inputs, output: dtypes.append(output.dtype))
    metrics = task.step(torch.rand(4, 3, 32, 32), generator=torch.Generator().manual_seed(0), step=1)
    assert dtypes == [torch.bfloat16] and all(math.isfinite(v) for v in metrics.values())
    assert all(p.dtype == torch.float32 for p in task.model.parameters())  # the weights stay fp32


def _task(model="vae", **fields):
    from genfast.training import RunConfig
    from genfast.training.distributed import World
    from genfast.training.tasks import TASKS

    config = RunConfig(model=model, out="unused", image_size=32, latent_dim=4, base_channels=8, backend="reference",
                       **fields).resolved(torch.device("cpu"))
    return TASKS[model](config, channels=3, device=torch.device("cpu"), world=World())


def test_lr_warmup_is_linear_over_the_first_updates():
    task = _task(lr=1e-3, lr_warmup=4)
    optimizer, g = task.optimizers["model"], torch.Generator().manual_seed(0)
    rates = []
    for step in range(1, 7):
        rates.append(optimizer.param_groups[0]["lr"])
        task.step(torch.rand(4, 3, 32, 32), generator=g, step=step)
    assert rates == pytest.approx([2.5e-4, 5e-4, 7.5e-4, 1e-3, 1e-3, 1e-3])
    assert not _task().schedulers and _task().config.lr_warmup == 0  # vae, wgan: no warm-up by default
    assert _task("ddpm", channel_mult=(1,), num_res_blocks=1, num_groups=8, timesteps=10).config.lr_warmup == 500


@pytest.mark.parametrize("precision", ["fp32", "fp16"])
def test_grad_clip_bounds_the_total_norm_of_each_update(precision):
    """The gradients the optimiser steps with have a total norm of at most --grad-clip (with fp16: of the
    unscaled gradients, the loss scaler having divided them first); without it they are left alone."""
    from genfast.training.distributed import World
    from genfast.training.precision import grad_scaler
    from genfast.training.tasks import optimizer_step

    def norm_at_step(max_grad_norm):
        torch.manual_seed(0)
        model = torch.nn.Linear(8, 8)
        optimizer = torch.optim.SGD(model.parameters(), lr=0.1)
        norms = []
        step = optimizer.step

        def spy(*args, **kwargs):
            norms.append(float(torch.stack([p.grad.norm() for p in model.parameters()]).norm()))
            return step(*args, **kwargs)

        optimizer.step = spy
        loss = (model(torch.randn(16, 8)) * 100).pow(2).mean()
        optimizer_step(optimizer, loss, name="loss", step=1, world=World(), device=torch.device("cpu"),
                       scaler=grad_scaler(precision, torch.device("cpu")), max_grad_norm=max_grad_norm)
        return norms[0]

    unclipped = norm_at_step(0.0)
    assert unclipped > 10
    assert norm_at_step(0.5) == pytest.approx(0.5, rel=1e-4)
    assert norm_at_step(10 * unclipped) == pytest.approx(unclipped, rel=1e-5)


def test_a_checkpoint_written_before_the_recipe_settings_resumes_with_what_it_ran(tmp_path):
    """A checkpoint of a DDPM run from before --prediction-type, --scale-shift, --num-groups, --lr-warmup and
    --grad-clip existed (no such config fields, no scheduler state) resumes as it ran: ε-prediction, the time
    embedding added before 32-group norms, no warm-up, no clipping — the same weights as a run given those
    settings explicitly."""
    legacy = ["--prediction-type", "epsilon", "--no-scale-shift", "--num-groups", "32", "--lr-warmup", "0",
              "--grad-clip", "0"]
    ddpm = ["--base-channels", "32", "--channel-mult", "1", "2", "--num-res-blocks", "1", "--timesteps", "10",
            "--sample-steps", "2"]
    run = ["train", "ddpm", *FLAGS_DATA, *ddpm]
    assert main([*run, *legacy, "--out", str(tmp_path / "straight"), "--max-steps", "3"]) == 0
    assert main([*run, *legacy, "--out", str(tmp_path / "old"), "--max-steps", "2"]) == 0
    path = tmp_path / "old" / "checkpoint.pt"
    saved = load_checkpoint(path)
    for name in ("prediction_type", "scale_shift", "num_groups", "lr_warmup", "grad_clip", "clip_sample",
                 "thresholding", "dynamic_thresholding_ratio", "sample_max_value"):
        del saved["config"][name]
    del saved["task"]["schedulers"]
    save_checkpoint(saved, path)
    assert main(["sample", "ddpm", "--checkpoint", str(path), "--steps", "2", "--num", "2", "--out",
                 str(tmp_path / "samples"), "--backend", "reference", "--device", "cpu", "--quiet"]) == 0
    assert main(["train", "ddpm", *FLAGS_DATA, "--out", str(tmp_path / "old"), "--max-steps", "3", "--resume"]) == 0
    straight = load_checkpoint(tmp_path / "straight" / "checkpoint.pt")
    resumed = load_checkpoint(path)
    _states_equal(straight["task"], resumed["task"])
    config = resumed["config"]
    assert (config["prediction_type"], config["scale_shift"], config["num_groups"], config["lr_warmup"],
            config["grad_clip"]) == ("epsilon", False, 32, 0, 0.0)
    assert config["clip_sample"] is True  # the pictures are drawn with today's sampler: x̂₀ clipped
