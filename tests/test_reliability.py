"""Reliability and security of the command line and the public ops: files never run code, every bad input is a
one-line error (exit 2) found before the first step, nothing is left behind, and the small defects of the fault
probe stay fixed. Ctrl-C / SIGTERM are in test_training.py, damaged images in test_data.py."""
import os
import stat
import subprocess
import sys

import pytest
import torch

import genfast
from genfast.checkpoint import load_checkpoint, save_checkpoint
from genfast.cli import main

SETTINGS = {"--num-samples": "24", "--image-size": "32", "--latent-dim": "4", "--base-channels": "8",
            "--batch-size": "8", "--backend": "torch", "--device": "cpu"}


def _flags(**overrides) -> list[str]:
    """The tiny run's flags with ``overrides`` (``batch_size="1"`` sets --batch-size 1)."""
    settings = dict(SETTINGS, **{f"--{k.replace('_', '-')}": v for k, v in overrides.items()})
    return [part for item in settings.items() for part in item] + ["--quiet"]


TINY = _flags()
DDPM = ["--base-channels", "32", "--channel-mult", "1", "--num-res-blocks", "1", "--timesteps", "10",
        "--sample-steps", "2"]


def _one_line_error(capsys, expected: str) -> str:
    err = capsys.readouterr().err.strip()
    assert len(err.splitlines()) == 1 and err.startswith("genfast ") and expected in err, err
    return err


class _RunsCode:
    """Unpickling this object would create ``marker``: a checkpoint that could run code."""

    def __init__(self, marker):
        self.marker = str(marker)

    def __reduce__(self):
        return (os.system, (f"touch {self.marker}",))


@pytest.fixture(scope="module")
def ddpm_run(tmp_path_factory):
    out = tmp_path_factory.mktemp("ddpm")
    assert main(["train", "ddpm", *TINY, *DDPM, "--max-steps", "1", "--out", str(out)]) == 0
    return out


# ---- files never run code; damaged ones are one-line errors ------------------------------------------------------

def test_a_checkpoint_whose_pickle_runs_code_is_refused_and_runs_nothing(tmp_path, capsys):
    marker = tmp_path / "ran"
    path = tmp_path / "run" / "checkpoint.pt"
    path.parent.mkdir()
    torch.save({"config": {"model": "vae"}, "task": _RunsCode(marker)}, path)
    assert main(["train", "vae", *TINY, "--out", str(path.parent), "--resume"]) == 2
    _one_line_error(capsys, "could run code (refused)")
    assert main(["sample", "ddpm", "--checkpoint", str(path), "--out", str(tmp_path / "s")]) == 2
    _one_line_error(capsys, "could run code (refused)")
    with pytest.raises(ValueError, match="could run code"):
        load_checkpoint(path)
    assert not marker.exists()


@pytest.mark.parametrize("content", [b"", b"PK\x03\x04 truncated", os.urandom(256), "keyless"],
                         ids=["empty", "truncated", "random", "keyless"])
def test_damaged_checkpoints_are_one_line_errors(tmp_path, capsys, content):
    path = tmp_path / "run" / "checkpoint.pt"
    path.parent.mkdir()
    if content == "keyless":
        save_checkpoint({"step": 3}, path)
    else:
        path.write_bytes(content)
    assert main(["train", "vae", *TINY, "--out", str(path.parent), "--resume"]) == 2
    _one_line_error(capsys, "--resume:")
    assert main(["sample", "ddpm", "--checkpoint", str(path), "--out", str(tmp_path / "s")]) == 2
    _one_line_error(capsys, "--checkpoint:")
    assert not (tmp_path / "s").exists()


def test_checkpoints_hold_plain_values_and_restore_every_random_state(tmp_path):
    """What the loop saves loads with weights_only=True, NumPy's state included."""
    assert main(["train", "vae", *TINY, "--max-steps", "1", "--out", str(tmp_path)]) == 0
    saved = torch.load(tmp_path / "checkpoint.pt", weights_only=True)
    assert saved["step"] == 1 and isinstance(saved["rng"][0]["numpy"][1], torch.Tensor)


# ---- every setting checked before the first step; one line, exit 2, nothing left behind ------------------------

@pytest.mark.parametrize("argv, expected", [
    (["train", "vae", "--seed", "-1"], "--seed: expected an integer in [0, 4294967295]"),
    (["train", "vae", "--seed", str(2**64)], "--seed: expected an integer"),
    (["train", "wgan", "--gp-weight", "-1"], "--gp-weight: expected a finite number >= 0"),
    (["train", "wgan", "--gp-weight", "nan"], "--gp-weight: expected a finite number >= 0"),
    (["train", "ddpm", *DDPM[:-2], "--sample-steps", "11"], "--sample-steps 11 must be <= --timesteps 10"),
    (["train", "vae", "--batch-size", "64"], "--batch-size 64 is larger than"),
])
def test_bad_settings_are_found_before_the_first_step(argv, expected, tmp_path, capsys):
    out = tmp_path / "run"
    if "--batch-size" in argv:  # the flag replaces the tiny run's own
        argv, flags = argv[:-2], _flags(batch_size=argv[-1])
    else:
        flags = TINY
    assert main([*argv, *flags, "--out", str(out)]) == 2
    _one_line_error(capsys, expected)
    assert not out.exists()  # a usage error leaves no (empty) output folder behind


@pytest.mark.parametrize("where", ["file", "empty", "sys"])
def test_bad_out_folders(where, tmp_path, capsys):
    out = {"file": tmp_path / "a_file", "empty": "", "sys": "/sys/genfast-run"}[where]
    if where == "file":
        out.write_text("not a folder")
    before = sorted(os.listdir("."))
    assert main(["train", "vae", *TINY, "--out", str(out)]) == 2
    _one_line_error(capsys, "--out")
    assert sorted(os.listdir(".")) == before  # nothing written into the current folder


def test_bad_backend_environment_variable(monkeypatch, capsys):
    monkeypatch.setattr(genfast._backend, "_current", None)
    monkeypatch.setenv("GENFAST_BACKEND", "bogus")
    assert main(["info"]) == 2
    _one_line_error(capsys, "GENFAST_BACKEND must be one of")


def test_sample_checks_steps_backend_and_out_before_sampling(ddpm_run, tmp_path, capsys, monkeypatch):
    checkpoint = str(ddpm_run / "checkpoint.pt")
    out = tmp_path / "samples"
    assert main(["sample", "ddpm", "--checkpoint", checkpoint, "--steps", "11", "--out", str(out)]) == 2
    _one_line_error(capsys, "--steps must be <= the model's T=10")
    assert main(["sample", "ddpm", "--checkpoint", checkpoint, "--sampler", "ddpm", "--steps", "3",
                 "--out", str(out)]) == 2
    _one_line_error(capsys, "the ddpm sampler runs all T=10 steps")
    assert main(["sample", "ddpm", "--checkpoint", checkpoint, "--out", ""]) == 2
    _one_line_error(capsys, "--out must name a folder")
    monkeypatch.setattr(genfast._backend, "triton_interpret", lambda: False)  # as outside the test suite
    assert main(["sample", "ddpm", "--checkpoint", checkpoint, "--backend", "triton", "--device", "cpu",
                 "--out", str(out)]) == 2
    _one_line_error(capsys, "--backend triton is not available on cpu")
    assert not out.exists()


# ---- smaller defects ----------------------------------------------------------------------------------------------

def test_pictures_use_the_backend_and_tiny_data_sets_train(tmp_path, monkeypatch):
    """--num-samples 3 --batch-size 1 writes an interpolation of its one pair; the end-of-run pictures run under
    --backend (seen through the backend the GroupNorm op resolves)."""
    seen = []
    resolve = genfast.ops.group_norm_silu.resolve_backend
    monkeypatch.setattr(genfast.ops.group_norm_silu, "resolve_backend",
                        lambda *a: seen.append(genfast.get_backend()) or resolve(*a))
    flags = _flags(num_samples="3", batch_size="1")
    assert main(["train", "ddpm", *flags, *DDPM, "--max-steps", "1", "--out", str(tmp_path / "ddpm")]) == 0
    assert seen and set(seen) == {"torch"}
    assert main(["train", "vae", *flags, "--max-steps", "1", "--out", str(tmp_path / "vae")]) == 0
    assert (tmp_path / "vae" / "interpolation.png").is_file()


def test_leftover_temporary_files_are_removed_and_modes_follow_the_umask(tmp_path):
    out = tmp_path / "run"
    out.mkdir()
    leftovers = [out / ".checkpoint.pt.abc123.tmp", out / ".metrics.csv.x.tmp"]
    for path in leftovers:
        path.write_bytes(b"half a file")
    (out / "mine.tmp").write_text("not genfast's")
    old = os.umask(0o022)
    try:
        assert main(["train", "vae", *TINY, "--max-steps", "1", "--out", str(out)]) == 0
    finally:
        os.umask(old)
    assert not any(p.exists() for p in leftovers) and (out / "mine.tmp").exists()
    for name in ("checkpoint.pt", "metrics.csv"):
        assert stat.S_IMODE((out / name).stat().st_mode) == 0o644, name
    leftovers[0].write_bytes(b"killed again")
    assert main(["train", "vae", *TINY, "--max-steps", "2", "--out", str(out), "--resume"]) == 0
    assert not leftovers[0].exists()


def test_resume_warns_about_each_ignored_flag(tmp_path, capsys):
    flags = [f for f in TINY if f != "--quiet"]
    assert main(["train", "vae", *flags, "--max-steps", "1", "--out", str(tmp_path)]) == 0
    capsys.readouterr()
    assert main(["train", "vae", *flags, "--max-steps", "2", "--lr", "0.5", "--beta", "3", "--out", str(tmp_path),
                 "--resume"]) == 0
    err = capsys.readouterr().err
    assert "--resume continues the checkpoint's run and ignores --lr 0.5 (checkpoint: None); --beta 3.0" in err
    assert load_checkpoint(tmp_path / "checkpoint.pt")["config"]["beta"] == 1.0


@pytest.mark.parametrize("args, kwargs, error, match", [
    ((0, 8), {}, ValueError, "num_groups must be a positive divisor of num_channels=8"),
    ((-2, 8), {}, ValueError, "num_groups must be a positive divisor"),
    ((2.0, 8), {}, TypeError, "num_groups must be an int"),
    ((2, 8), dict(eps=-1), ValueError, "eps must be a finite number > 0"),
    ((2, 0), {}, ValueError, "num_channels must be a positive int"),
])
def test_group_norm_silu_module_checks_its_arguments(args, kwargs, error, match):
    with pytest.raises(error, match=match):
        genfast.nn.GroupNormSiLU(*args, **kwargs)


def test_no_cuda_runtime_warning_on_ordinary_commands():
    """Looking for nvcc (what the loader does on CUDA machines) prints no 'No CUDA runtime is found' warning."""
    code = "import genfast.cpp as c; c.cuda_skip_reason(); c.cuda_library_dir()"
    result = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert result.returncode == 0, result.stderr
    assert "No CUDA runtime" not in result.stderr


# ---- the ops: no silent NaN, no silent non-gradient ---------------------------------------------------------------

SCHEDULE = genfast.NoiseSchedule.linear(50)
X = torch.randn(2, 3, 4)


@pytest.mark.parametrize("call, match", [
    (lambda: genfast.ddim_step(X, 10, 20, X, SCHEDULE, eta=0.5), "t_prev must be <= t"),
    (lambda: genfast.ddim_step(X, torch.tensor([9, 9]), torch.tensor([3, 12]), X, SCHEDULE, eta=1.0),
     "t_prev must be <= t"),
    (lambda: genfast.ddim_step(X, 10, 5, X, SCHEDULE, eta=1.5), "eta must be in"),
    (lambda: genfast.q_sample(X, 3, SCHEDULE, noise=X.clone().requires_grad_()), "noise must not require grad"),
    (lambda: genfast.ddpm_step(X, 3, X, SCHEDULE, noise=X.clone().requires_grad_()), "noise must not require grad"),
    (lambda: genfast.reparameterize(X, X, X.clone().requires_grad_()), "noise must not require grad"),
    (lambda: genfast.reparameterize_kl(X, X, X.clone().requires_grad_()), "noise must not require grad"),
    (lambda: genfast.diffusion_loss(lambda x, t: x, X[:0], SCHEDULE), "x0 must have at least one element"),
], ids=["ddim_int_t_prev", "ddim_tensor_t_prev", "ddim_eta", "q_sample_noise", "ddpm_noise", "reparameterize_noise",
        "reparameterize_kl_noise", "empty_loss"])
@pytest.mark.parametrize("backend_name", ["reference", "cpp"])
def test_ops_refuse_what_would_be_a_silent_nan_or_a_lost_gradient(call, match, backend_name):
    if genfast._backend.why_not(backend_name) is not None:
        pytest.skip(genfast._backend.why_not(backend_name))
    with genfast.use_backend(backend_name), pytest.raises(ValueError, match=match):
        call()


def test_deterministic_ddim_inversion_and_a_step_to_the_same_timestep_stay_allowed():
    """η = 0 with t_prev > t (inversion), and η > 0 with t_prev = t (σ = 0: diffusers' last step without
    set_alpha_to_one)."""
    assert torch.isfinite(genfast.ddim_step(X, 10, 20, X, SCHEDULE, eta=0.0)).all()
    assert torch.isfinite(genfast.ddim_step(X, 0, 0, X, SCHEDULE, eta=1.0)).all()


def test_checkpoints_of_older_genfast_with_numpy_states_still_load(tmp_path):
    """Before weights_only loading, NumPy's state was saved as an ndarray: such files load (data, no code) and
    restore it."""
    import numpy as np

    from genfast.checkpoint import set_rng_state

    state = dict(torch=torch.get_rng_state(), cuda=None, python=__import__("random").getstate(),
                 numpy=np.random.get_state(), generators={})
    torch.save(dict(config={}, rng=[state]), tmp_path / "old.pt")
    expected = np.random.rand()
    set_rng_state(load_checkpoint(tmp_path / "old.pt")["rng"][0], {})
    assert np.random.rand() == expected


def test_backend_checks_every_op_the_model_runs():
    """--backend cpp on CUDA: C++ has only GroupNorm there, so a VAE (reparameterize) is refused before it starts."""
    from genfast.training import RunConfig

    assert "no cuda kernels for reparameterize" in RunConfig(model="vae", out="x", backend="cpp").backend_reason("cuda")
    assert RunConfig(model="ddpm", out="x", backend="reference").backend_reason("cuda") is None


def test_abbreviated_flags_count_as_given_for_the_resume_warning():
    from genfast.cli import _given, build_parser

    given = _given(build_parser(), ["train", "wgan", "--gp", "5", "--lr=0.1", "--b", "3", "--out", "x"])
    assert given == {"gp_weight", "lr", "out"}  # --b is ambiguous (--batch-size, --beta1, --backend, ...)


def test_backend_errors_keep_their_type_under_torch_compile():
    with genfast.use_backend("cpp"), pytest.raises(TypeError, match="cannot run group_norm_silu on torch.float64"):
        torch.compile(lambda x: genfast.group_norm_silu(x, 2), backend="eager")(
            torch.randn(2, 4, 3, dtype=torch.float64))
