"""The β-VAE comparison: several seeds, the reconstruction floor, the factor × latent MI table, and the report's
sentences judged against the seeds' spread."""
import math
import re

import pytest
import torch

from genfast.beta_report import CARRIED_MARGIN, findings, summarise
from genfast.compare_beta import compare_beta, evaluate
from genfast.data import FACE_FACTORS
from genfast.training import RunConfig, UsageError, train

TINY = dict(model="vae", dataset="faces", num_samples=48, image_size=32, batch_size=8, max_steps=2, latent_dim=4,
            base_channels=8, holdout=16, backend="reference", device="cpu", quiet=True)


def test_evaluate_reports_the_excess_over_the_entropy_floor(tmp_path):
    result = train(RunConfig(out=str(tmp_path), **TINY))
    m = evaluate(result)
    x = torch.stack([result.dataset[i] for i in result.eval_indices]).double()
    # the floor from its definition, with clamped logs: per image Σ_i −x ln x − (1 − x) ln(1 − x)
    tiny = 1e-300
    floor = -(x * x.clamp_min(tiny).log() + (1 - x) * (1 - x).clamp_min(tiny).log()).flatten(1).sum(1).mean()
    assert m["floor"] == pytest.approx(float(floor), rel=1e-9)
    assert m["excess"] == pytest.approx(m["recon"] - float(floor), rel=1e-9)
    assert 0 < m["excess"] < m["recon"]
    assert m["factor_mi"].shape == (len(FACE_FACTORS), 4)
    assert ((m["factor_mi"] >= 0) & (m["factor_mi"] <= 1)).all()
    assert ((m["chance"] >= 0) & (m["chance"] <= 1)).all()


def test_compare_beta_over_two_seeds_reports_mean_and_spread(tmp_path):
    base = RunConfig(out=str(tmp_path), seed=3, **TINY)
    report = compare_beta(base, [4, 1], seeds=2).read_text()
    for beta in ("1", "4"):
        for seed in (3, 4):
            assert (tmp_path / f"beta_{beta}" / f"seed_{seed}" / "samples.png").is_file()
    rows = {line.split(" | ")[0]: line for line in report.splitlines() if re.match(r"\| [14] \| [-\d]", line)}
    assert set(rows) == {"| 1", "| 4"}
    assert all(row.count(" ± ") >= 9 for row in rows.values())  # every measured column has a spread
    assert "seeds 3–4" in report and "sample standard deviation over 2 seeds" in report
    assert "excess over floor" in report and "| floor |" in report and "Σ_i H(x_i)" in report
    assert "## Which latent carries each factor" in report
    for name in FACE_FACTORS:
        assert re.search(rf"\| [14] \| {name} \| z\d, z\d \| ", report)
    values = [float(v) for v in re.findall(r"\| (\d\.\d\d)(?= \|)", report.split("## Which latent")[1])]
    assert values and all(0 <= v <= 1 for v in values)  # the normalised MI matrices
    assert re.search("exceeds the spread|within the spread", report.split("## What the numbers show")[1])


def test_compare_beta_rejects_bad_seeds(tmp_path):
    base = RunConfig(out=str(tmp_path), **TINY)
    for bad in (0, -1, 1.5, True, "2"):
        with pytest.raises(UsageError, match=r"seeds \(--seeds\) must be a positive int"):
            compare_beta(base, [1, 4], seeds=bad)
    with pytest.raises(UsageError, match="largest seed"):
        compare_beta(RunConfig(out=str(tmp_path), **{**TINY, "seed": 2**32 - 1}), [1, 4], seeds=2)


def _run(recon, floor, kl, top, chance=0.05, mse=0.01):
    """One seed's evaluate() dict with two factors: the first carried by z0 (normalised MI ``top``), the second by
    no latent (0.02 everywhere)."""
    factor_mi = torch.tensor([[top, 0.1, 0.0], [0.02, 0.02, 0.02]], dtype=torch.float64)
    return dict(recon=recon, floor=floor, excess=recon - floor, kl=kl, mse=mse, active_units=3, latent_dim=3,
                smoothness=1.2, mig=top - 0.1, factor_mi=factor_mi, chance=torch.tensor([chance, chance]),
                seconds=1.0)


def test_findings_tell_differences_beyond_the_spread_from_those_within():
    metrics = {1.0: [_run(7185, 7168, 14.0, 0.60), _run(7186, 7168, 14.2, 0.40)],  # excess 17, 18; top 0.5 ± 0.14
               4.0: [_run(7197, 7168, 9.0, 0.55), _run(7198, 7168, 9.4, 0.45)]}    # excess 29, 30; top 0.5 ± 0.07
    lines = findings(metrics, ("lighting", "smile"))
    text = "\n".join(lines)
    assert "sample standard deviation over 2 seeds" in lines[0]
    recon = next(line for line in lines if line.startswith("- Reconstruction"))
    # excess 29.5 ± 0.7 vs 17.5 ± 0.7: 1.69×, far beyond the spread, though the losses themselves are 1.00×
    assert "excess over the data's floor is 1.69× that of β=1" in recon
    assert "29.5 ± 0.7 vs 17.5 ± 0.7 nats per image: exceeds the spread" in recon and "1.00×" in recon
    assert "(0.01000 ± 0.00000 vs 0.01000 ± 0.00000: within the spread)" in recon  # equal MSE
    assert re.search(r"- KL: .*: exceeds the spread\)", text)
    assert "lighting 0.50 ± 0.07 vs 0.50 ± 0.14, within the spread" in text
    assert f"less than {CARRIED_MARGIN:g} above the chance level" in text
    assert "at β=1 no latent carries smile" in text and "at β=4 no latent carries smile" in text
    assert "no latent carries lighting" not in text


def test_findings_with_one_seed_judge_nothing_against_a_spread():
    metrics = {1.0: [_run(7185, 7168, 14.0, 0.6)], 4.0: [_run(7197, 7168, 9.0, 0.6)]}
    text = "\n".join(findings(metrics, ("lighting", "smile")))
    assert "one seed" in text and "no spread" in text
    assert "exceeds the spread" not in text and "within the spread" not in text
    assert "(29.0 vs 17.0 nats per image;" in text and "1.71×" in text
    summary = summarise(metrics[1.0])
    assert summary["excess"] == (17.0, None) and summary["latent"] == [[0], [0]]
    assert math.isclose(summary["gap"][0][0], 0.5)
