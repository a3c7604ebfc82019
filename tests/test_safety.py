"""Nothing runs code from a file, and a failed save keeps the previous checkpoint."""

import contextlib
import json
import os
import pickle
import re
import shutil
import subprocess
import sys
from collections.abc import Iterator
from pathlib import Path

import pytest
import torch

import resnetlab
from resnetlab.runs import RunDir
from resnetlab.train.checkpoint import (
    CheckpointError,
    load_checkpoint,
    save_checkpoint,
)

SRC = Path(resnetlab.__file__).parent


def test_every_torch_load_in_the_package_is_weights_only() -> None:
    calls = []
    for path in SRC.rglob("*.py"):
        for m in re.finditer(r"torch\.load\(([^)]*)\)", path.read_text()):
            calls.append((path.name, m.group(1)))
    assert calls, "the trainer state is read with torch.load somewhere"
    assert all("weights_only=True" in args for _, args in calls), calls
    assert not [p for p in SRC.rglob("*.py") if re.search(r"\bpickle\.loads?\(",
                                                         p.read_text())]


class _Evil:
    def __init__(self, marker: Path) -> None:
        self.marker = marker

    def __reduce__(self):
        return (os.mknod, (str(self.marker),))


def _saved(tmp_path: Path) -> tuple[Path, torch.nn.Module]:
    model = resnetlab.create_model("resnet8")
    state = {"iteration": 3, "optimizer": {}, "schedule": {}, "recent_errors": [],
             "rng": torch.get_rng_state()}
    return save_checkpoint(RunDir(tmp_path / "run"), model, state, None, {}), model


def test_files_written_whole_get_the_mode_of_an_ordinary_write(tmp_path: Path) -> None:
    """A run's config, metrics and weights go through write_atomic; mkstemp alone made them
    owner-only, unreadable to the group a cluster's runs are shared with."""
    from resnetlab.files import write_atomic

    old = os.umask(0o027)
    try:
        write_atomic(tmp_path / "a.txt", lambda p: Path(p).write_text("a"))
        ckpt = save_checkpoint(RunDir(tmp_path / "run"), resnetlab.create_model("resnet8"),
                               {"iteration": 1}, None, {})
    finally:
        os.umask(old)
    assert (tmp_path / "a.txt").stat().st_mode & 0o777 == 0o640
    assert (ckpt / "trainer_state.pt").stat().st_mode & 0o777 == 0o640


def test_crafted_trainer_state_is_refused_without_running(tmp_path: Path) -> None:
    ckpt, model = _saved(tmp_path)
    assert load_checkpoint(ckpt, model)["iteration"] == 3
    marker = tmp_path / "pwned"
    with open(ckpt / "trainer_state.pt", "wb") as f:
        pickle.dump({"iteration": _Evil(marker)}, f, protocol=2)
    with pytest.raises(CheckpointError, match="cannot be loaded safely") as err:
        load_checkpoint(ckpt, model)
    assert not marker.exists()
    with pytest.raises(pickle.UnpicklingError) as why:  # what torch itself says, first line
        torch.load(ckpt / "trainer_state.pt", weights_only=True)
    reason = str(why.value).splitlines()[0]
    assert str(err.value) == f"{ckpt / 'trainer_state.pt'} cannot be loaded safely: {reason}"
    torch.save({"iteration": _Evil(marker)}, ckpt / "trainer_state.pt")
    with pytest.raises(CheckpointError):
        load_checkpoint(ckpt, model)
    assert not marker.exists()


def test_truncated_weights_in_a_checkpoint_name_the_file(tmp_path: Path) -> None:
    ckpt, model = _saved(tmp_path)
    data = (ckpt / "model.safetensors").read_bytes()
    (ckpt / "model.safetensors").write_bytes(data[:100])
    with pytest.raises(resnetlab.WeightsError, match=r"model\.safetensors"):
        load_checkpoint(ckpt, model)


@contextlib.contextmanager
def _read_only(path: Path) -> Iterator[None]:
    """Make `path` unwritable for this process: mode 555 for a normal user; for root, who
    writes through any mode (as CI runs), a read-only bind mount of the folder on itself."""
    if os.geteuid() != 0:
        os.chmod(path, 0o555)
        try:
            yield
        finally:
            os.chmod(path, 0o755)
        return
    mount = ["mount", "--bind", str(path), str(path)]
    if subprocess.run(mount, capture_output=True).returncode:
        pytest.skip("root without the right to mount: no way to make a folder read-only")
    try:
        subprocess.run(["mount", "-o", "remount,bind,ro", str(path)], check=True)
        yield
    finally:
        subprocess.run(["umount", str(path)], check=True)


def test_read_only_directory_keeps_previous_checkpoint(tmp_path: Path) -> None:
    ckpt, model = _saved(tmp_path)
    with _read_only(tmp_path / "run" / "checkpoints"):
        with pytest.raises(CheckpointError, match=r"(Read-only file system|Permission "
                           r"denied).*previous checkpoint is kept"):
            save_checkpoint(RunDir(tmp_path / "run"), model, {"iteration": 4}, None, {})
        assert RunDir(tmp_path / "run").latest_checkpoint() == ckpt
    assert RunDir(tmp_path / "run").latest_checkpoint() == ckpt
    assert load_checkpoint(ckpt, resnetlab.create_model("resnet8"))["iteration"] == 3


def test_checkpoint_reaches_the_disk_before_latest_points_at_it(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """The order that makes a power cut safe: every file of the checkpoint and its folder
    fsynced, then the rename; the pointer's own file fsynced, then its rename, then the
    folder holding it."""
    events: list[tuple[str, str]] = []
    fsync, replace = os.fsync, os.replace

    def logged_fsync(fd: int) -> None:
        events.append(("fsync", os.readlink(f"/proc/self/fd/{fd}")))
        fsync(fd)

    def logged_replace(src: object, dst: object) -> None:
        events.append(("replace", str(dst)))
        replace(src, dst)

    monkeypatch.setattr(os, "fsync", logged_fsync)
    monkeypatch.setattr(os, "replace", logged_replace)
    run = RunDir(tmp_path / "run")
    root = run.checkpoints
    target = save_checkpoint(run, resnetlab.create_model("resnet8"), {"iteration": 5}, None, {})
    moved = events.index(("replace", str(target)))
    synced = [path for kind, path in events[:moved] if kind == "fsync"]
    tmp = str(root / f".tmp-{target.name}")
    for name in ("model.safetensors", "config.json", "trainer_state.pt"):
        assert any(p.startswith(f"{tmp}/.{name}.") for p in synced), name
    assert synced[-1] == tmp  # the folder's entries, after its files
    after = events[moved + 1:]
    pointer = after.index(("replace", str(root / "latest")))
    assert after[pointer - 1][0] == "fsync" and "/.latest." in after[pointer - 1][1]
    assert after[pointer + 1] == ("fsync", str(root))


def test_failing_save_keeps_previous_checkpoint(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt, model = _saved(tmp_path)

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("resnetlab.train.checkpoint.torch.save", disk_full)
    with pytest.raises(CheckpointError) as err:
        save_checkpoint(RunDir(tmp_path / "run"), model, {"iteration": 9}, None, {})
    assert str(err.value) == f"cannot write a checkpoint in {tmp_path / 'run' / 'checkpoints'}: " \
        "No space left on device; the previous checkpoint is kept"
    assert RunDir(tmp_path / "run").latest_checkpoint() == ckpt
    state = load_checkpoint(ckpt, resnetlab.create_model("resnet8"))
    assert state["iteration"] == 3


def test_saves_keep_the_newest_and_clear_only_their_own_leftovers(tmp_path: Path) -> None:
    run, model = RunDir(tmp_path / "run"), resnetlab.create_model("resnet8")
    root = run.checkpoints
    root.mkdir(parents=True)
    (root / ".tmp-ckpt-00000009").mkdir()  # what a killed save leaves behind
    (root / ".latest.x1.tmp").write_text("ckpt-00000009\n")
    (root / "notes.txt").write_text("mine")  # not the saver's: never touched
    for i in (1, 2, 3):
        target = save_checkpoint(run, model, {"iteration": i}, None, {}, keep=2)
    assert target == root / "ckpt-00000003"
    assert sorted(p.name for p in root.iterdir()) == ["ckpt-00000002", "ckpt-00000003",
                                                      "latest", "notes.txt"]
    assert (root / "latest").read_text() == "ckpt-00000003\n"
    # A resumed run that reaches iteration 3 again supersedes that checkpoint.
    save_checkpoint(run, model, {"iteration": 3, "again": True}, None, {}, keep=2)
    assert load_checkpoint(run.latest_checkpoint() or root, model)["again"] is True
    (root / "ckpt-00000003" / "trainer_state.pt").unlink()  # a pointer to an incomplete one
    assert run.latest_checkpoint() == root / "ckpt-00000002"  # the newest complete one
    (root / "latest").unlink()
    assert run.latest_checkpoint() == root / "ckpt-00000002"
    save_checkpoint(run, model, {"iteration": 4}, None, {})  # by default only the newest
    assert sorted(p.name for p in root.glob("ckpt-*")) == ["ckpt-00000004"]
    # Resumed from an older checkpoint, a run never removes a newer one: not superseded.
    save_checkpoint(run, model, {"iteration": 2}, None, {})
    assert sorted(p.name for p in root.glob("ckpt-*")) == ["ckpt-00000002", "ckpt-00000004"]


def test_a_checkpoint_holding_others_files_is_never_removed(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        caplog: pytest.LogCaptureFixture) -> None:
    """`resnetlab eval` and `export` of an unfinished run write beside its latest weights
    (runs.py): pruning keeps that checkpoint, saying so once; a step saved again replaces
    its checkpoint only once the new one is whole, and keeps the old one aside if it holds
    such files."""
    run, model = RunDir(tmp_path / "run"), resnetlab.create_model("resnet8")
    root = run.checkpoints
    first = save_checkpoint(run, model, {"iteration": 1}, None, {})
    (first / "eval-test-10crop.json").write_text("{}")
    (first / "export").mkdir()
    (first / "export" / "model.onnx").write_bytes(b"graph")
    caplog.set_level("WARNING")
    for i in (2, 3):
        save_checkpoint(run, model, {"iteration": i}, None, {})
    assert sorted(p.name for p in root.glob("ckpt-*")) == ["ckpt-00000001", "ckpt-00000003"]
    assert (first / "export" / "model.onnx").read_bytes() == b"graph"
    said = [r.message for r in caplog.records if "ckpt-00000001" in r.message]
    assert len(said) == 1 and "eval-test-10crop.json, export, which training did not" in said[0]
    # The same step saved again (a resume from an older checkpoint) and the disk full: the
    # checkpoint of that step is still there, whole.
    third = root / "ckpt-00000003"
    before = (third / "model.safetensors").read_bytes()

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("resnetlab.train.checkpoint.torch.save", disk_full)
    with pytest.raises(CheckpointError):
        save_checkpoint(run, model, {"iteration": 3, "again": True}, None, {})
    monkeypatch.undo()
    assert run.latest_checkpoint() == third
    assert (third / "model.safetensors").read_bytes() == before
    # Saved again with a report beside it: the old one is kept aside, the report with it.
    (third / "eval-test-center.json").write_text("{}")
    save_checkpoint(run, model, {"iteration": 3, "again": True}, None, {})
    assert load_checkpoint(third, model)["again"] is True
    assert not (third / "eval-test-center.json").exists()
    kept = root / "replaced-ckpt-00000003"
    assert (kept / "eval-test-center.json").is_file() and "again" not in load_checkpoint(
        kept, model)
    assert not list(root.glob(".tmp-*"))
    (third / "eval-val-center.json").write_text("{}")  # and once more: a second copy kept
    save_checkpoint(run, model, {"iteration": 3}, None, {})
    assert (root / "replaced-ckpt-00000003-2" / "eval-val-center.json").is_file()
    assert (kept / "eval-test-center.json").is_file()
    # A save that fails after setting the old one aside (the pointer on a full disk): the
    # report set aside with it survives that and the next save's sweep of temporaries.
    (third / "eval-test-10crop.json").write_text("{}")
    from resnetlab.train import checkpoint

    real = checkpoint.write_atomic

    def pointer_fails(path: Path, write: object) -> None:
        if path == run.pointer:
            raise OSError(28, "No space left on device")
        real(path, write)  # type: ignore[arg-type]

    monkeypatch.setattr(checkpoint, "write_atomic", pointer_fails)
    with pytest.raises(CheckpointError):
        save_checkpoint(run, model, {"iteration": 3}, None, {})
    monkeypatch.undo()
    save_checkpoint(run, model, {"iteration": 4}, None, {})
    assert (root / "replaced-ckpt-00000003-3" / "eval-test-10crop.json").is_file()


def test_a_checkpoint_records_the_run_and_survives_leftovers_of_its_own_name(
        tmp_path: Path) -> None:
    run = RunDir(tmp_path)
    root = run.checkpoints
    model = resnetlab.create_model("resnet8", num_classes=2)
    root.mkdir(parents=True)
    (root / ".tmp-ckpt-00000001").mkdir()  # a save of this very iteration was killed
    (root / ".tmp-ckpt-00000001" / "model.safetensors").write_text("torn")
    target = save_checkpoint(run, model, {"iteration": 1}, ["cat", "dog"],
                             {"mean": [0.5], "std": [0.25], "input_size": 28})
    (root / ".tmp-ckpt-00000002").mkdir()
    save_checkpoint(run, model, {"iteration": 2}, ["cat", "dog"], {}, keep=2)
    config = json.loads((target / "config.json").read_text())
    assert config["class_names"] == ["cat", "dog"]
    assert (config["mean"], config["std"], config["input_size"]) == ([0.5], [0.25], 28)
    deep = RunDir(tmp_path / "new-run" / "deeper")  # no folder of it exists yet
    assert save_checkpoint(deep, model, {"iteration": 5}, None, {}).is_dir()


def test_pruning_what_is_already_gone_does_not_fail_a_save(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    # Another process (a second trainer, a user's rm) may remove an old checkpoint or a
    # leftover between the listing and the removal: the new checkpoint still counts.
    from resnetlab.train import checkpoint

    run, model = RunDir(tmp_path / "run"), resnetlab.create_model("resnet8")
    root = run.checkpoints
    save_checkpoint(run, model, {"iteration": 1}, None, {})
    (root / ".tmp-ckpt-00000007").mkdir()
    (root / ".latest.zz.tmp").write_text("x")
    rmtree, unlink = shutil.rmtree, Path.unlink

    def vanished_first(path: Path, *args: object, **kwargs: object) -> None:
        rmtree(path)
        rmtree(path, *args, **kwargs)  # type: ignore[arg-type]

    def unlinked_first(self: Path, *args: object, **kwargs: object) -> None:
        if self.name.endswith(".tmp"):
            unlink(self)
        unlink(self, *args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(checkpoint.shutil, "rmtree", vanished_first)
    monkeypatch.setattr(Path, "unlink", unlinked_first)
    save_checkpoint(run, model, {"iteration": 2}, None, {})
    monkeypatch.undo()
    assert run.latest_checkpoint() == root / "ckpt-00000002"
    assert sorted(p.name for p in root.iterdir()) == ["ckpt-00000002", "latest"]


BOMB = '''
import sys
from pathlib import Path
from resnetlab.data.images import ImageError, load_image

def peak_kib():
    line = [ln for ln in Path("/proc/self/status").read_text().splitlines()
            if ln.startswith("VmHWM")][0]
    return int(line.split()[1])

Path("/proc/self/clear_refs").write_text("5")  # the peak so far no longer counts (Linux)
before = peak_kib()
try:
    load_image(sys.argv[1])
except ImageError as e:
    print("refused", before, peak_kib(), e)
'''


def test_decompression_bomb_is_refused_without_decoding_it(tmp_path: Path) -> None:
    """72 megapixels: above our 64M limit, below the 89M at which Pillow itself would
    refuse, so only our check stands between it and decoding. The file is written here, so
    the child's peak memory starts low and would grow by 72 MB if it decoded the image."""
    from PIL import Image

    bomb = tmp_path / "bomb.png"
    Image.new("1", (8500, 8500)).save(bomb)
    script = tmp_path / "bomb.py"
    script.write_text(BOMB)
    out = subprocess.run([sys.executable, str(script), str(bomb)], capture_output=True,
                         text=True, timeout=120).stdout.split()
    assert out[0] == "refused", out
    rss_before, rss_after = int(out[1]), int(out[2])
    assert rss_after - rss_before < 30_000  # KiB
    assert "64,000,000" in " ".join(out)  # refused by our check, not by Pillow's


def test_debug_flag_shows_the_traceback() -> None:
    plain = subprocess.run([sys.executable, "-m", "resnetlab", "train", "--preset", "nope"],
                           capture_output=True, text=True)
    debug = subprocess.run([sys.executable, "-m", "resnetlab", "train", "--preset", "nope",
                            "--debug"], capture_output=True, text=True)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert len(plain.stderr.strip().splitlines()) == 1
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr
