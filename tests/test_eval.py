"""Sample quality (genfast.evaluation, genfast.feature_net, ``genfast eval``): precision/recall on constructed
manifolds, the sanity cases of FID/KID/precision/recall on the faces, the cached feature network, eval.json."""
import json
import sys

import pytest
import torch

from genfast import feature_net
from genfast.cli import main
from genfast.data import FACE_FACTORS, make_faces
from genfast.evaluation import Evaluator, factor_spread, precision_recall

from evaluation_fixtures import TINY_FEATURES, tiny_feature_net  # noqa: F401 (a fixture)

N = 200  # faces per set: tiny, as every set here


def test_precision_recall_of_points_on_a_line():
    """Real points 0..9 (k = 1: radius 1 each); fake 0.5, 1.5 (inside) and 100, 101 (outside), radius 1 each:
    precision 2/4, recall = the reals within 1 of 0.5 or 1.5 = {0, 1, 2}: 3/10."""
    real = torch.arange(10.0)[:, None]
    fake = torch.tensor([[0.5], [1.5], [100.0], [101.0]])
    assert precision_recall(real, fake, k=1) == (0.5, pytest.approx(0.3))
    assert precision_recall(real, real, k=3) == (1.0, 1.0)
    with pytest.raises(ValueError, match="N > k = 4"):
        precision_recall(real, fake, k=4)


@pytest.fixture
def evaluator(tiny_feature_net):
    net, record = tiny_feature_net
    return Evaluator(make_faces(N, seed=1, image_size=32)[0], net=net, record=record, faces=True)


def test_sanity_real_noise_and_one_repeated_image(evaluator):
    """Held-out real faces: FID near 0, precision and recall near 1; uniform noise: a large FID; one real face
    repeated: recall near 0 (all its samples are one point), precision 1 (that point is a face)."""
    held_out = make_faces(N, seed=2, image_size=32)[0]
    real = evaluator(held_out)
    noise = evaluator(torch.rand_like(held_out))
    repeated = evaluator(held_out[:1].expand(N, -1, -1, -1))
    assert real["fid"] < 0.02 * noise["fid"] and real["fid"] < 2.0, (real["fid"], noise["fid"])
    assert real["precision"] > 0.85 and real["recall"] > 0.85, real
    assert abs(real["kid"]) < 0.01 * noise["kid"], (real["kid"], noise["kid"])
    assert noise["precision"] < 0.2
    assert repeated["recall"] < 0.02 and repeated["precision"] == 1.0
    assert repeated["fid"] > 10 * real["fid"]
    assert real["num_samples"] == real["num_reference"] == N and real["k"] == 3
    assert set(real["factors"]) == set(FACE_FACTORS)
    assert evaluator(held_out) == real  # the KID subsets are seeded: the same samples, the same numbers
    assert "torch_fidelity" not in sys.modules  # torchmetrics' FID/KID with genfast's own feature network


def test_factor_spread_compares_distributions():
    data = torch.rand(4000, 2)
    same = factor_spread(data, torch.rand(4000, 2), names=("a", "b"))
    collapsed = factor_spread(data, torch.full((4000, 2), 0.5), names=("a", "b"))
    assert same["a"]["wasserstein"] < 0.03 and same["a"]["data_std"] == pytest.approx(12 ** -0.5, abs=0.01)
    assert collapsed["a"]["wasserstein"] == pytest.approx(0.25, abs=0.01)  # E|U − 1/2| for U ~ U(0, 1)
    assert collapsed["b"]["samples_std"] == 0.0


def test_the_feature_network_is_trained_once_and_cached_by_its_settings(tmp_path, monkeypatch, capsys):
    settings = feature_net.FeatureNetSettings(num_faces=64, holdout=16, epochs=1, width=4, feature_dim=8)
    net, record = feature_net.load_feature_net(settings, cache=tmp_path)
    path = tmp_path / f"feature-net-{settings.digest()}.pt"
    assert path.is_file() and "training the feature network" in capsys.readouterr().err
    assert record["settings_hash"] == settings.digest() and record["settings"] == settings.to_dict()
    assert set(record["heldout"]["r2"]) == set(FACE_FACTORS) and 0 <= record["heldout"]["accuracy"] <= 1
    mtime = path.stat().st_mtime_ns
    again, record_again = feature_net.load_feature_net(settings, cache=tmp_path)
    assert path.stat().st_mtime_ns == mtime and capsys.readouterr().err == ""  # read, not trained again
    assert record_again["weights_hash"] == record["weights_hash"] and record_again["heldout"] == record["heldout"]
    images = torch.rand(3, 1, 28, 28)  # any size, grey or RGB
    assert torch.equal(net(images), again(images)) and net(images).shape == (3, 8)
    other = feature_net.FeatureNetSettings(num_faces=64, holdout=16, epochs=1, width=4, feature_dim=8, seed=1)
    assert other.digest() != settings.digest()
    monkeypatch.setenv(feature_net.CACHE_ENV, str(tmp_path / "env"))
    assert feature_net.cache_dir() == tmp_path / "env"
    monkeypatch.delenv(feature_net.CACHE_ENV)
    monkeypatch.setenv("XDG_CACHE_HOME", str(tmp_path / "xdg"))
    assert feature_net.cache_dir() == tmp_path / "xdg" / "genfast"


def test_genfast_eval_writes_eval_json_and_prints_a_table(tmp_path, tiny_feature_net, capsys):
    run = tmp_path / "run"
    assert main(["train", "vae", "--num-samples", "32", "--image-size", "32", "--latent-dim", "4",
                 "--base-channels", "8", "--batch-size", "8", "--max-steps", "2", "--ema", "0.9", "--backend",
                 "reference", "--device", "cpu", "--quiet", "--out", str(run)]) == 0
    out = tmp_path / "eval"
    assert main(["eval", "--checkpoint", str(run / "checkpoint.pt"), "--num", "16", "--out", str(out),
                 "--backend", "reference", "--device", "cpu"]) == 0
    table = capsys.readouterr().out
    for word in ("FID", "KID", "precision (k=3)", "recall (k=3)", "lighting", "hue"):
        assert word in table
    result = json.loads((out / "eval.json").read_text())
    for key in ("fid", "kid", "precision", "recall", "num_samples", "feature_net", "factors", "run"):
        assert key in result, key
    assert result["num_samples"] == 16 and result["feature_net"]["settings_hash"] == TINY_FEATURES.digest()
    assert result["feature_net"]["weights_hash"] == tiny_feature_net[1]["weights_hash"]
    assert result["run"]["ema"] == 0.9 and result["run"]["step"] == 2
    assert f"{result['fid']:.4f}" in table
    assert (out / "samples.png").is_file()


def test_genfast_eval_of_a_ddpm_samples_with_the_runs_x0_settings_or_the_flags(tmp_path, tiny_feature_net):
    run = tmp_path / "run"
    assert main(["train", "ddpm", "--num-samples", "32", "--image-size", "32", "--base-channels", "32",
                 "--channel-mult", "1", "2", "--num-res-blocks", "1", "--timesteps", "10", "--sample-steps", "2",
                 "--batch-size", "8", "--max-steps", "1", "--prediction-type", "v_prediction", "--backend",
                 "reference", "--device", "cpu", "--quiet", "--out", str(run)]) == 0
    common = ["--checkpoint", str(run / "checkpoint.pt"), "--num", "8", "--backend", "reference", "--device", "cpu",
              "--quiet"]
    assert main(["eval", *common, "--out", str(tmp_path / "default")]) == 0
    result = json.loads((tmp_path / "default" / "eval.json").read_text())
    assert result["run"]["prediction_type"] == "v_prediction"
    assert result["run"]["sampling"] == dict(clip_sample=True, thresholding=False, dynamic_thresholding_ratio=0.995,
                                             sample_max_value=1.0)
    assert main(["eval", *common, "--out", str(tmp_path / "flags"), "--no-clip-sample", "--thresholding",
                 "--dynamic-thresholding-ratio", "0.9", "--sample-max-value", "2"]) == 0
    result = json.loads((tmp_path / "flags" / "eval.json").read_text())
    assert result["run"]["sampling"] == dict(clip_sample=False, thresholding=True, dynamic_thresholding_ratio=0.9,
                                             sample_max_value=2.0)
