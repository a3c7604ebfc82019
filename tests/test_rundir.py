"""RunDir: the one owner of a run directory's file names, and how paths resolve to runs."""

from pathlib import Path

import pytest
import torch

import resnetlab
from resnetlab.train.checkpoint import save_checkpoint
from resnetlab.train.rundir import RunDir, eval_report_path, export_dir, weights_dir


def test_the_layout_is_the_documented_one(tmp_path: Path) -> None:
    run = RunDir(str(tmp_path))
    assert run.path == tmp_path and run == RunDir(tmp_path)
    names = {k: getattr(run, k).relative_to(tmp_path).as_posix() for k in (
        "config", "metrics", "summary", "checkpoints", "pointer", "final", "eval_report",
        "curves", "confusion")}
    assert names == {"config": "config.yaml", "metrics": "metrics.jsonl",
                     "summary": "summary.csv", "checkpoints": "checkpoints",
                     "pointer": "checkpoints/latest", "final": "final",
                     "eval_report": "eval.json", "curves": "curves.png",
                     "confusion": "confusion.png"}
    assert run.checkpoint(730) == tmp_path / "checkpoints" / "ckpt-00000730"
    assert export_dir(run.final) == tmp_path / "final" / "export"
    assert eval_report_path(run.final, "val", "10crop") == tmp_path / "final" / \
        "eval-val-10crop.json"


def test_started_finished_and_the_weights_a_run_offers(tmp_path: Path) -> None:
    run, model = RunDir(tmp_path / "run"), resnetlab.create_model("resnet8")
    assert not run.started() and not run.finished() and run.weights() is None
    assert weights_dir(run.path) == run.path  # nothing there: load_model says what lacks
    run.path.mkdir()
    run.config.write_text("seed: 0\n")
    assert not run.started()  # a config alone: nothing trained yet
    run.metrics.write_text("")
    assert run.started() and not run.finished()
    run.metrics.unlink()
    ckpt = save_checkpoint(run, model, {"iteration": 7}, None, {})
    assert run.started() and run.checkpoint_dirs() == [ckpt]
    assert run.weights() == ckpt == weights_dir(run.path)
    resnetlab.save_weights(model, run.final)
    assert run.weights() == run.final == weights_dir(run.path)
    assert weights_dir(ckpt) == ckpt  # a weights directory is taken as it is
    assert not run.finished()
    run.eval_report.write_text("{}")
    assert run.finished()


@pytest.mark.parametrize("pointer", [None, "ckpt-00000099\n", "ckpt-00000003\n"])
def test_latest_names_only_a_complete_checkpoint(tmp_path: Path, pointer: str | None) -> None:
    run = RunDir(tmp_path)
    save_checkpoint(run, resnetlab.create_model("resnet8"), {"iteration": 3}, None, {})
    if pointer is None:
        run.pointer.unlink()
    else:
        run.pointer.write_text(pointer)
    found = run.latest_checkpoint()
    assert found == (run.checkpoint(3) if pointer == "ckpt-00000003\n" else None)
    if found is not None:
        (found / "trainer_state.pt").unlink()
        assert run.latest_checkpoint() is None


def test_a_path_inside_a_run_finds_the_run(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    model = resnetlab.create_model("resnet8")
    ckpt = save_checkpoint(run, model, {"iteration": 1, "rng": torch.get_rng_state()},
                           None, {})
    resnetlab.save_weights(model, run.final)
    assert RunDir.around(run.path) is None  # no config.yaml: not a run
    run.config.write_text("seed: 0\n")
    for inside in (run.path, run.final, ckpt):
        assert RunDir.around(inside) == run
    assert RunDir.around(tmp_path / "elsewhere") is None
