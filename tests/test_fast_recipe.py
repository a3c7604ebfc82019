"""The fast Fashion-MNIST recipe's pieces: flip test-time views, the trainer's `tta`, the
preset, and `bench time-to-accuracy` over seeds (issue 32). Accuracy and time are the
benchmark's to measure (docs/results/fast-recipe), never asserted here."""

import json
from pathlib import Path

import pytest
import torch
from torch import nn

from resnetlab.benchmarks import accuracy, run_benchmark
from resnetlab.config import resolve
from resnetlab.errors import ConfigError
from resnetlab.evaluation.evaluate import evaluate, predict_probs
from resnetlab.recipes import PRESETS
from resnetlab.runs import RunDir
from resnetlab.train import loop


def _net() -> nn.Module:
    torch.manual_seed(0)
    return nn.Sequential(nn.Conv2d(1, 4, 3, padding=1), nn.ReLU(), nn.Flatten(),
                         nn.Linear(4 * 8 * 8, 5)).eval()


def test_flip_views_average_the_image_and_its_mirror() -> None:
    model, x = _net(), torch.randn(6, 1, 8, 8)
    with torch.no_grad():
        probs = predict_probs(model, x, "flip")
        expected = (model(x).softmax(1) + model(x.flip(-1)).softmax(1)) / 2
        # a mirrored image has the same two views, so the same answer
        mirrored = predict_probs(model, x.flip(-1), "flip")
    torch.testing.assert_close(probs, expected)
    torch.testing.assert_close(mirrored, probs)
    assert not torch.allclose(probs, model(x).softmax(1).detach())  # not the centre view


def test_evaluate_scores_flip_views() -> None:
    """Labelled with the flip views' own answers, the flip score is perfect; the centre view
    alone, which disagrees on some images (a batch where it does is drawn), is not."""
    model = _net()
    for seed in range(100):
        x = torch.randn(20, 1, 8, 8, generator=torch.Generator().manual_seed(seed))
        y = predict_probs(model, x, "flip").argmax(1).detach()  # the flip views' own answers
        centre = predict_probs(model, x, "center").argmax(1).detach()
        if (centre != y).any():
            break
    assert (centre != y).any()
    assert evaluate(model, [(x, y)], 5, "flip").top1_error == 0.0
    assert evaluate(model, [(x, y)], 5, "center").top1_error == pytest.approx(
        float((centre != y).float().mean()))


def test_training_tta_is_checked_in_one_line() -> None:
    assert resolve("smoke", sets=["tta=flip"]).tta == "flip"
    with pytest.raises(ConfigError, match="resnetlab eval --tta") as e:
        resolve("smoke", sets=["tta=10crop"])
    assert "\n" not in str(e.value)


def test_every_evaluation_of_a_run_scores_the_configured_views(
        tmp_path: Path, fashion_dir: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    seen: list[str] = []
    real = loop.evaluate

    def spy(model, batches, n, tta="center", **kw):  # type: ignore[no-untyped-def]
        seen.append(tta)
        return real(model, batches, n, tta, **kw)

    monkeypatch.setattr(loop, "evaluate", spy)
    cfg = resolve("smoke", sets=["tta=flip", f"data.data_dir={fashion_dir}", "data.verify=false",
                                 "schedule.iterations=4", "eval_every=2"])
    loop.train(cfg, tmp_path / "run", progress=False)
    assert seen and set(seen) == {"flip"}  # val and test, mid-run and final
    assert json.loads(RunDir(tmp_path / "run").eval_report.read_text())["tta"] == "flip"


def test_reached_reads_the_first_evaluation_at_each_target() -> None:
    rows = [{"test_error": 0.12, "elapsed_s": 10.0}, {"test_error": None, "elapsed_s": 15.0},
            {"test_error": 0.075, "elapsed_s": 20.0}, {"test_error": 0.05, "elapsed_s": 30.0}]
    got = accuracy.reached(rows)
    assert got == {"90%": 20.0, "92%": 20.0, "93%": 30.0, "94%": 30.0, "95%": 30.0}


def test_summary_gives_median_and_range() -> None:
    runs = [{"test_accuracy": a, "wall_s": w} for a, w in ((0.94, 100.0), (0.93, 90.0),
                                                          (0.95, 120.0))]
    s = accuracy.summary(runs)
    assert (s["test_accuracy_median"], s["test_accuracy_min"], s["test_accuracy_max"]) == \
        (0.94, 0.93, 0.95)
    assert (s["wall_s_median"], s["runs"]) == (100.0, 3)


def test_time_to_accuracy_runs_a_preset_over_seeds(tmp_path: Path, fashion_dir: Path,
                                                   capsys: pytest.CaptureFixture[str]) -> None:
    assert run_benchmark("time-to-accuracy", [
        "--preset", "smoke", "--seeds", "2", "--out", str(tmp_path),
        "--set", f"data.data_dir={fashion_dir}", "--set", "data.verify=false",
        "--set", "schedule.iterations=4"]) == 0
    report = json.loads((tmp_path / "bench-time-to-accuracy.json").read_text())
    assert [r["seed"] for r in report["runs"]] == [0, 1]
    assert {r["precision"] for r in report["runs"]} <= {"fp32", "bf16"}  # what auto chose
    for k in (0, 1):  # each seed its own run, trained with that seed
        assert RunDir(tmp_path / f"seed{k}").finished()
        assert f"seed: {k}" in (tmp_path / f"seed{k}" / "config.yaml").read_text()
    s = report["summary"]
    assert s["test_accuracy_min"] <= s["test_accuracy_median"] <= s["test_accuracy_max"]
    assert "median: test accuracy" in capsys.readouterr().out


def test_fast_preset_chooses_on_validation_and_reports_on_test() -> None:
    cfg = resolve("fashion-mnist-fast")
    assert "fashion-mnist-fast" in PRESETS
    assert cfg.data.dataset == "fashion-mnist" and cfg.data.val_split > 0
    assert cfg.tta == "flip"
    # one evaluation, after the last iteration, however long the run is made
    longer = resolve("fashion-mnist-fast", sets=["schedule.iterations=100000"])
    assert longer.eval_every > longer.schedule.iterations
