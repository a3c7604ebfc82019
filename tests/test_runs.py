"""RunDir: the one owner of a run directory's file names, how paths resolve to runs, and
the config and data a run's weights were trained on."""

import json
import os
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from PIL import Image

import resnetlab
from resnetlab.config import resolve, to_yaml
from resnetlab.data.sources import DataError
from resnetlab.errors import ConfigError
from resnetlab.evaluation.evaluate import EvalResult
from resnetlab.runs import (
    RunDir,
    eval_report_path,
    export_dir,
    run_config,
    run_data,
    weights_dir,
)
from resnetlab.train.checkpoint import save_checkpoint


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
    # scored another way: another file (--recompute-bn, --data, a backend and precision)
    assert eval_report_path(run.final, "test", "center", "openvino", "bf16", True,
                            "folder").name == "eval-test-center-recomputed-bn-on-folder-" \
        "openvino-bf16.json"


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


@pytest.mark.parametrize("pointer", [None, "ckpt-00000099\n", "ckpt-00000003\n", "ckpt-1",
                                     "../../etc\n", b"\xff\xfe"])
def test_latest_is_the_pointer_else_the_newest_complete_checkpoint(
        tmp_path: Path, pointer: str | bytes | None) -> None:
    """A missing, dangling or garbled pointer never hides existing work (issue 16: a
    resume once restarted from scratch over it and deleted it)."""
    run = RunDir(tmp_path)
    model = resnetlab.create_model("resnet8")
    for i in (3, 5):
        save_checkpoint(run, model, {"iteration": i}, None, {}, keep=2)
    if pointer is None:
        run.pointer.unlink()
    elif isinstance(pointer, bytes):
        run.pointer.write_bytes(pointer)
    else:
        run.pointer.write_text(pointer)
    expected = run.checkpoint(3) if pointer == "ckpt-00000003\n" else run.checkpoint(5)
    assert run.latest_checkpoint() == expected
    (expected / "trainer_state.pt").unlink()  # incomplete: the next complete one
    assert run.latest_checkpoint() == run.checkpoint(3 if expected == run.checkpoint(5) else 5)
    for d in run.checkpoint_dirs():
        (d / "trainer_state.pt").unlink(missing_ok=True)
    assert run.latest_checkpoint() is None


def test_the_lock_refuses_a_second_holder_and_dies_with_its_holder(tmp_path: Path) -> None:
    run = RunDir(tmp_path / "run")
    with run.lock(), pytest.raises(ConfigError, match=rf"run is in use by pid {os.getpid()} on "
                       rf"{socket.gethostname()} since .*; wait for it to end or choose "
                       "another --out$"), run.lock():
        pass
    assert not run.path.exists()  # a run that never wrote its config leaves nothing
    run.make()
    run.config.write_text("seed: 0\n")
    with run.lock():
        pass
    assert run.lock_file.read_text() == ""  # released, and the holder's line cleared
    holder = subprocess.Popen(
        [sys.executable, "-c", "import sys, time; from resnetlab.runs import RunDir\n"
         "with RunDir(sys.argv[1]).lock():\n    print('held', flush=True); time.sleep(60)",
         str(run.path)], stdout=subprocess.PIPE, text=True)
    try:
        assert holder.stdout is not None and holder.stdout.readline() == "held\n"
        with pytest.raises(ConfigError, match=f"in use by pid {holder.pid} "), run.lock():
            pass
    finally:
        holder.kill()  # SIGKILL: no clean-up of its own
        holder.wait()
    with run.lock():  # the kernel released it: no stale lock
        pass


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


def _weights(path: Path) -> Path:
    model = resnetlab.create_model("resnet8", in_chans=1, num_classes=10)
    return resnetlab.save_weights(model, path, mean=[0.25], std=[0.5])


def test_run_config_is_the_runs_own_or_the_named_data_set(tmp_path: Path,
                                                          fashion_dir: Path) -> None:
    alone = _weights(tmp_path / "alone")
    with pytest.raises(ConfigError, match=r"alone is not inside a run directory: say which data "
                       r"set with --data \(fashion-mnist, mnist, cifar10, cifar100, folder\)$"):
        run_config(alone)
    named = run_config(alone, "mnist")
    assert (named.data.dataset, named.data.data_dir, named.preset) == ("mnist", None, "custom")
    both = run_config(alone, "fashion-mnist", str(fashion_dir))
    assert (both.data.dataset, both.data.data_dir) == ("fashion-mnist", str(fashion_dir))
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.config.write_text(to_yaml(resolve("smoke", sets=["data.verify=false"])))
    _weights(run.final)
    own = run_config(run.final)
    assert (own.preset, own.data.val_split, own.data.data_dir) == ("smoke", 128, None)
    moved = run_config(run.final, data_dir=str(fashion_dir))
    assert (moved.preset, moved.data.data_dir) == ("smoke", str(fashion_dir))


def test_run_data_uses_the_weights_statistics_and_the_given_settings(
        tmp_path: Path, fashion_dir: Path) -> None:
    run = RunDir(tmp_path / "run")
    run.path.mkdir()
    run.config.write_text(to_yaml(resolve("smoke", sets=["data.verify=false"])))
    _weights(run.final)
    data = run_data(run.final, data_dir=str(fashion_dir))
    assert (data.mean, data.std) == ([0.25], [0.5])  # saved beside the weights, not refitted
    assert [len(y) for _, y in data.train_eval.batches(0)] == [500, 12]  # default batch 500
    assert [len(y) for _, y in run_data(run.final, 128, data_dir=str(fashion_dir))
            .test.batches(0)] == [128, 128]
    # Outside a run the named data set is read from the named folder (and, as any named
    # data set, MD5-checked: the synthetic files here fail that check).
    with pytest.raises(DataError, match=f"{fashion_dir}/train-images.* fails its MD5 check"):
        run_data(_weights(tmp_path / "alone"), 64, "fashion-mnist", str(fashion_dir))
    folder = tmp_path / "images"
    for split in ("train", "val"):
        for cls, colour in (("cat", (200, 30, 30)), ("dog", (30, 30, 200))):
            (folder / split / cls).mkdir(parents=True)
            for i in range(3):
                Image.new("RGB", (30, 30), colour).save(folder / split / cls / f"{i}.png")
    (folder / "val" / "dog" / "zz-broken.png").write_text("not an image")
    pictures = RunDir(tmp_path / "pictures")
    pictures.path.mkdir()
    pictures.config.write_text(to_yaml(resolve(None, sets=[
        "data.dataset=folder", f"data.data_dir={folder}", "data.val_split=0",
        "data.image_size=24", "data.workers=0", "data.max_bad_fraction=0.5",
        "model.name=resnet18"])))
    resnetlab.save_weights(resnetlab.create_model("resnet18", num_classes=2), pictures.final)
    assert sum(len(y) for _, y in run_data(pictures.final, 4).test.batches(0)) == 6
    with pytest.raises(DataError, match=r"--strict .*zz-broken\.png"):  # before any batch
        run_data(pictures.final, 4, strict=True)


def test_an_eval_report_is_indented_json_written_whole(tmp_path: Path) -> None:
    res = EvalResult(0.25, 0.0, 0.5, 4, [0.5, 1.0], [[1, 1], [0, 2]])
    path = res.save(tmp_path / "eval.json", ["cat", "dog"], split="test")
    report = res.report(["cat", "dog"], split="test")
    assert path.read_text() == json.dumps(report, indent=2) + "\n"
    assert json.loads(path.read_text())["per_class_accuracy"] == {"cat": 0.5, "dog": 1.0}
