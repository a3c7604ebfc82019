"""`resnetlab runs`: the table of the runs below a folder (runlist.py, cli/runs.py), and the
TensorBoard scalars MetricsLog writes beside metrics.jsonl (log.tensorboard=true)."""

import json
import shutil
import subprocess
import sys
from collections.abc import Iterator
from dataclasses import asdict
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import yaml

from resnetlab.cli import main
from resnetlab.config import TrainConfig, to_yaml
from resnetlab.errors import ConfigError
from resnetlab.report import MetricsLog
from resnetlab.runlist import RunRow, find_runs, summarise
from resnetlab.runs import RunDir

FIXTURE = Path(__file__).parent / "fixtures" / "run-0.1.0"


def train_rec(it: int, loss: float = 2.0, err: float = 0.5, lr: float = 0.1,
              ips: float = 900.0) -> dict[str, Any]:
    return {"kind": "train", "iteration": it, "epoch": it / 10, "loss": loss,
            "train_error": err, "lr": lr, "images_per_s": ips}


def eval_rec(it: int, val: float | None, test: float | None,
             elapsed: float = 1.0) -> dict[str, Any]:
    return {"kind": "eval", "iteration": it, "epoch": it / 10, "train_loss": 2.0,
            "train_error": 0.5, "lr": 0.1, "images_per_s": 900.0, "elapsed_s": elapsed,
            "val_error": val, "test_error": test}


# --------------------------------------------------------------------------- TensorBoard

def scalars(run: RunDir) -> dict[str, list[tuple[int, float]]]:
    """Every scalar TensorBoard would show for the run: tag -> [(step, value)]."""
    from tensorboard.backend.event_processing.event_accumulator import EventAccumulator

    acc = EventAccumulator(str(run.tensorboard))
    acc.Reload()
    return {tag: [(e.step, e.value) for e in acc.Scalars(tag)]
            for tag in acc.Tags()["scalars"]}


def f32(x: float) -> float:
    """What an event file stores of a float."""
    return float(np.float32(x))


def test_tensorboard_scalars_are_the_records_at_their_iterations(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    log = MetricsLog(run, tensorboard=True)
    assert not run.tensorboard.exists()  # opened at the first write, not before
    log.write(train_rec(5, loss=2.31, err=0.875, lr=0.1, ips=1204.7))
    log.write(train_rec(10, loss=1.9, err=0.6, lr=0.05, ips=1309.3))
    log.write(eval_rec(10, val=0.4375, test=None))  # no test score on this evaluation
    log.write(eval_rec(20, val=0.25, test=0.3125))
    assert scalars(run) == {
        "train/loss": [(5, f32(2.31)), (10, f32(1.9))],
        "train/error": [(5, f32(0.875)), (10, f32(0.6))],
        "train/lr": [(5, f32(0.1)), (10, f32(0.05))],
        "train/images_per_s": [(5, f32(1204.7)), (10, f32(1309.3))],
        "eval/val_error": [(10, f32(0.4375)), (20, f32(0.25))],
        "eval/test_error": [(20, f32(0.3125))],
    }
    log.close()
    log.close()  # twice is harmless: the loop closes it however the run ends
    assert len(log.records()) == 4  # metrics.jsonl is written as before


def test_a_killed_run_keeps_every_scalar_it_wrote(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    writer = ("import json, os, signal, sys\nfrom resnetlab.report import MetricsLog\n"
              "from resnetlab.runs import RunDir\n"
              "log = MetricsLog(RunDir(sys.argv[1]), tensorboard=True)\n"
              "for line in sys.argv[2:]:\n    log.write(json.loads(line))\n"
              "os.kill(os.getpid(), signal.SIGKILL)  # no close(), no exit handlers")
    records = [train_rec(it, loss=it / 10) for it in (1, 2, 3)] + [eval_rec(3, 0.5, 0.25)]
    done = subprocess.run([sys.executable, "-c", writer, str(run.path),
                           *map(json.dumps, records)])
    assert done.returncode == -9
    got = scalars(run)
    assert got["train/loss"] == [(1, f32(0.1)), (2, f32(0.2)), (3, f32(0.3))]
    assert got["train/images_per_s"] == [(1, 900.0), (2, 900.0), (3, 900.0)]
    assert got["eval/val_error"] == [(3, 0.5)] and got["eval/test_error"] == [(3, 0.25)]


def test_a_resume_drops_the_scalars_past_its_checkpoint(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    first = MetricsLog(run, tensorboard=True)
    for it in (5, 10, 15, 20):
        first.write(train_rec(it, loss=float(it)))
    first.write(eval_rec(10, val=0.5, test=0.6))
    first.write(eval_rec(20, val=0.4, test=0.45))
    first.close()
    resumed = MetricsLog(run, tensorboard=True)  # the run resumes from iteration 10
    resumed.truncate_after(10)
    resumed.write(train_rec(15, loss=115.0))
    resumed.write(train_rec(20, loss=120.0))
    resumed.close()
    got = scalars(run)
    assert got["train/loss"] == [(5, 5.0), (10, 10.0), (15, 115.0), (20, 120.0)]
    # the eval at 20 was not redone (yet): it is gone, not left from the first attempt
    assert got["eval/val_error"] == [(10, f32(0.5))]
    assert got["eval/test_error"] == [(10, f32(0.6))]
    assert [r["iteration"] for r in resumed.records()] == [5, 10, 10, 15, 20]


def test_tensorboard_off_writes_no_event_files(tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    log = MetricsLog(run)
    log.write(train_rec(5))
    log.truncate_after(0)
    log.close()
    assert run.metrics.exists() and not run.tensorboard.exists()


def test_tensorboard_without_the_package_is_a_one_line_error(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # None in sys.modules makes `import` fail as if the package were not installed
    monkeypatch.setitem(sys.modules, "tensorboard", None)
    monkeypatch.setitem(sys.modules, "torch.utils.tensorboard", None)
    with pytest.raises(ConfigError) as e:
        MetricsLog(RunDir(tmp_path), tensorboard=True)
    assert str(e.value) == ("log.tensorboard=true needs the tensorboard package: "
                            "pip install tensorboard")
    MetricsLog(RunDir(tmp_path)).write(train_rec(5))  # off, the package is not needed


# ------------------------------------------------------------------------------ run table

def make_run(path: Path, *, model: str = "resnet20", iterations: int = 20,
             precision: str | None = "auto", dataset: str = "cifar10",
             data_dir: str | None = None, records: list[dict[str, Any]] | None = None,
             report: dict[str, Any] | None = None, choices: str | None = None,
             options: dict[str, Any] | None = None) -> RunDir:
    """A run directory as the trainer leaves it; precision None: a config without the key."""
    cfg = TrainConfig()
    cfg.model.name, cfg.schedule.iterations = model, iterations
    cfg.model.options = options or {}
    cfg.data.dataset, cfg.data.data_dir = dataset, data_dir
    run = RunDir(path)
    run.make()
    if precision is None:
        tree = asdict(cfg)
        del tree["precision"]
        run.config.write_text(yaml.safe_dump(tree, sort_keys=False))
    else:
        cfg.precision = precision
        run.config.write_text(to_yaml(cfg))
    if records is not None:
        run.metrics.write_text("".join(json.dumps(r) + "\n" for r in records))
    if report is not None:
        run.eval_report.write_text(json.dumps({"top5_error": 0.01, "loss": 0.3, **report}))
        run.final.mkdir()
        (run.final / "config.json").write_text("{}")
    if choices is not None:
        run.choices.write_text(json.dumps({"precision": choices, "reason": "native bf16"}))
    return run


@pytest.fixture
def runs(tmp_path: Path) -> Path:
    """A folder of runs in every state, nested at several depths, and a non-run."""
    root = tmp_path / "runs"
    done = make_run(root / "cifar" / "done", model="resnet32", iterations=20,
                    records=[train_rec(10), eval_rec(10, 0.5, 0.55, 20.0), train_rec(20),
                             eval_rec(20, 0.3, 0.35, 40.0)],
                    report={"top1_error": 0.0856, "train_seconds": 3000.0, "iterations": 20},
                    choices="bf16")
    # A checkpoint holding a config.yaml of its own is still not a run: never looked into
    (done.checkpoints / "ckpt-00000020").mkdir(parents=True)
    (done.checkpoints / "ckpt-00000020" / "config.yaml").write_text("model: {name: x}\n")
    stopped = make_run(root / "cifar" / "stopped", model="resnet56", iterations=64000,
                       precision="fp32", dataset="folder", data_dir="/data/flowers/",
                       records=[train_rec(500), eval_rec(500, 0.62, None, 30.5),
                                train_rec(1000), eval_rec(1000, 0.41, 0.44, 95.0),
                                eval_rec(1500, None, None, 100.0)])
    with stopped.metrics.open("a") as f:
        f.write('{"kind": "train", "iter')  # a write a kill cut short: tolerated
    make_run(root / "fresh", precision=None, iterations=1000, options={"plain": True})
    shutil.copytree(FIXTURE, root / "old" / "run-0.1.0")
    broken = make_run(root / "zz-broken", records=[train_rec(10)])
    broken.config.write_text("model: [resnet20\n")  # not YAML
    bad_metrics = make_run(root / "zz-metrics", records=[train_rec(10)])
    with bad_metrics.metrics.open("a") as f:
        f.write("garbage\n" + json.dumps(train_rec(20)) + "\n")
    (root / "notes").mkdir()
    (root / "notes" / "todo.txt").write_text("not a run\n")
    return root


def files_of(root: Path) -> dict[str, tuple[bytes, int]]:
    return {p.relative_to(root).as_posix(): (p.read_bytes(), p.stat().st_mtime_ns)
            for p in root.rglob("*") if p.is_file()}


def rows_by_name(root: Path) -> dict[str, RunRow]:
    return {r.path.relative_to(root).as_posix(): summarise(r) for r in find_runs(root)}


def test_every_run_below_the_folder_is_found_and_nothing_else(runs: Path) -> None:
    assert [r.path.relative_to(runs).as_posix() for r in find_runs(runs)] == [
        "cifar/done", "cifar/stopped", "fresh", "old/run-0.1.0", "zz-broken", "zz-metrics"]
    assert find_runs(runs / "cifar" / "done") == [RunDir(runs / "cifar" / "done")]
    assert find_runs(runs / "notes") == []
    assert find_runs(runs / "missing") == []


def test_each_run_is_summarised_from_its_files(runs: Path) -> None:
    rows = rows_by_name(runs)
    assert rows["cifar/done"] == RunRow(
        runs / "cifar" / "done", "resnet32", "cifar10", "bf16", 20, 20, 0.3, 0.0856, 3000.0,
        "finished")
    # no eval.json: the time is the last evaluation's; the best val skips the None
    assert rows["cifar/stopped"] == RunRow(
        runs / "cifar" / "stopped", "resnet56", "folder:flowers", "fp32", 1500, 64000, 0.41,
        None, 100.0, "stopped")
    # reproduce's plain twins are resnet<d> with plain=true: the option is shown
    assert rows["fresh"] == RunRow(runs / "fresh", "resnet20 (plain=true)", "cifar10", "-",
                                   None, 1000, None, None, None, "not started")
    assert rows["old/run-0.1.0"] == RunRow(
        runs / "old" / "run-0.1.0", "resnet8", "fashion-mnist", "fp32", 10, 20, 0.84375, None,
        0.3490471500008425, "stopped")


def test_a_run_that_cannot_be_read_gets_a_row_of_what_can(runs: Path) -> None:
    rows = rows_by_name(runs)
    broken = rows["zz-broken"]
    assert (broken.model, broken.data, broken.precision, broken.done, broken.planned,
            broken.status, broken.unknown) == ("?", "?", "?", 10, None, "unreadable",
                                               frozenset({"planned"}))
    assert "is not valid YAML" in broken.problem and "\n" not in broken.problem
    metrics = rows["zz-metrics"]
    assert (metrics.model, metrics.planned, metrics.done, metrics.status) == (
        "resnet20", 20, None, "unreadable")
    assert metrics.unknown == {"done", "best_val_error", "seconds"}
    assert metrics.problem == "metrics.jsonl line 2 is not JSON"


def test_the_table_lists_every_run_and_changes_nothing(
        runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    before = files_of(runs)
    assert main(["runs", str(runs)]) == 0
    out = capsys.readouterr().out
    assert out.splitlines() == [
        "run            model                  data            precision  iterations  best val"
        "  test error      time  status",
        "-------------  ---------------------  --------------  ---------  ----------  --------"
        "  ----------  --------  -----------",
        "cifar/done     resnet32               cifar10         bf16            20/20    30.00%"
        "       8.56%  50.0 min  finished",
        "cifar/stopped  resnet56               folder:flowers  fp32       1500/64000    41.00%"
        "           -   1.7 min  stopped",
        "fresh          resnet20 (plain=true)  cifar10         -              -/1000         -"
        "           -         -  not started",
        "old/run-0.1.0  resnet8                fashion-mnist   fp32            10/20    84.38%"
        "           -       0 s  stopped",
        "zz-broken      ?                      ?               ?                10/?         -"
        "           -         -  unreadable",
        "zz-metrics     resnet20               cifar10         auto             ?/20         ?"
        "           -         ?  unreadable",
        f"zz-broken: config file {runs / 'zz-broken' / 'config.yaml'} is not valid YAML: "
        + broken_yaml_reason(runs),
        "zz-metrics: metrics.jsonl line 2 is not JSON",
    ]
    assert files_of(runs) == before  # not a byte written, no file made or removed


def broken_yaml_reason(runs: Path) -> str:
    try:
        yaml.safe_load((runs / "zz-broken" / "config.yaml").read_text())
    except yaml.YAMLError as e:
        return " ".join(str(e).split())
    raise AssertionError("the broken config parsed")


def test_the_table_sorts_by_test_error(runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    shutil.copytree(runs / "cifar" / "done", runs / "better")
    report = json.loads((runs / "better" / "eval.json").read_text())
    (runs / "better" / "eval.json").write_text(json.dumps({**report, "top1_error": 0.07}))
    assert main(["runs", str(runs), "--sort", "test"]) == 0
    names = [ln.split()[0] for ln in capsys.readouterr().out.splitlines()[2:8]]
    # those with a test error first, lowest first; the rest in path order
    assert names == ["better", "cifar/done", "cifar/stopped", "fresh", "old/run-0.1.0",
                     "zz-broken"]


def test_a_run_given_itself_is_row_dot(runs: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["runs", str(runs / "cifar" / "done")]) == 0
    assert capsys.readouterr().out.splitlines()[2].split()[0] == "."


def test_no_run_and_no_folder_are_one_line_each(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["runs", str(tmp_path)]) == 0
    assert capsys.readouterr().out == (f"no runs under {tmp_path} (a run is a folder holding "
                                       "a config.yaml)\n")
    assert main(["runs", str(tmp_path / "missing")]) == 2
    err = capsys.readouterr().err
    assert err == (f"{tmp_path / 'missing'} is not a folder; give the one your runs are in: "
                   "resnetlab runs DIR\n")


@pytest.fixture
def holder(tmp_path: Path) -> Iterator[tuple[RunDir, subprocess.Popen[str]]]:
    """A run whose lock another process holds until it is killed."""
    run = make_run(tmp_path / "run", records=[train_rec(10)])
    proc = subprocess.Popen(
        [sys.executable, "-c", "import sys\nfrom resnetlab.runs import RunDir\n"
         "with RunDir(sys.argv[1]).lock():\n    print('held', flush=True)\n    sys.stdin.read()",
         str(run.path)], stdin=subprocess.PIPE, stdout=subprocess.PIPE, text=True)
    try:
        assert proc.stdout is not None and proc.stdout.readline() == "held\n"
        yield run, proc
    finally:
        proc.kill()
        proc.wait()


def test_a_run_locked_by_another_process_is_running(
        holder: tuple[RunDir, subprocess.Popen[str]]) -> None:
    run, proc = holder
    line = run.lock_file.read_text()
    assert summarise(run).status == "running"
    assert summarise(run).status == "running"  # the probe let go of the lock it tried
    assert run.lock_file.read_text() == line  # the holder's line is left as it was
    proc.kill()
    proc.wait()
    assert summarise(run).status == "stopped"  # the lock died with its holder


def lock_is_free(path: Path) -> bool:
    """Whether another process could take the lock on `path` now."""
    probe = ("import fcntl, sys\nf = open(sys.argv[1], 'a')\n"
             "try:\n    fcntl.lockf(f, fcntl.LOCK_EX | fcntl.LOCK_NB)\n"
             "except OSError:\n    sys.exit(3)")
    return subprocess.run([sys.executable, "-c", probe, str(path)]).returncode == 0


def test_a_run_this_process_trains_is_running_and_stays_locked(tmp_path: Path) -> None:
    run = make_run(tmp_path / "run")
    with run.lock():
        assert summarise(run).status == "running"
        # probing must not have dropped this process's own lock (POSIX locks go with any
        # close of the file)
        assert not lock_is_free(run.lock_file)
    assert lock_is_free(run.lock_file)
    assert summarise(run).status == "not started"
