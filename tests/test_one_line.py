"""Issue 16, items 3 and 5: every bad path, file or value a user can give is one line that
says what to do, never a traceback and never a message about something else."""

import os
import subprocess
import sys
from pathlib import Path

import pytest

from resnetlab.cli import main


def _one_line(argv: list[str], capsys: pytest.CaptureFixture[str]) -> str:
    capsys.readouterr()
    assert main(argv) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and err[0].startswith("error: "), err
    return err[0]


def _files(root: Path) -> dict[Path, bytes]:
    return {p: p.read_bytes() for p in root.rglob("*") if p.is_file() and p.name != ".lock"}


def test_paths_that_are_not_what_they_should_be(run_dir: Path, tmp_path: Path,
                                                capsys: pytest.CaptureFixture[str]) -> None:
    a_file = tmp_path / "afile"
    a_file.write_text("x")
    image = tmp_path / "x.png"
    image.write_bytes(b"")
    assert _one_line(["predict", str(a_file), str(image), "--backend", "torch",
                      "--precision", "fp32"], capsys) == \
        f"error: {a_file} is a file; give a run directory or a weights directory (one " \
        "holding config.json and the weights)"
    assert _one_line(["train", "--preset", "smoke", "--out", str(a_file)], capsys) == \
        f"error: {a_file} is a file, not a run directory; choose another --out"
    assert _one_line(["train", "--preset", "smoke", "--out", str(a_file / "run")],
                     capsys) == f"error: cannot create the run directory {a_file / 'run'}: " \
        "Not a directory; choose another --out"
    # --out of eval: the file asked for is named (not the temporary file beside it)
    assert _one_line(["eval", str(run_dir), "--backend", "torch", "--precision", "fp32",
                      "--out", str(a_file / "e.json")], capsys) == \
        f"error: {a_file / 'e.json'}: Not a directory (--debug shows the traceback)"
    assert a_file.read_text() == "x"


@pytest.mark.parametrize("content", [b"batch_size: 32\n\xff\xfe\n", b"[1, 2]\n", b"just text"])
def test_a_damaged_config_yaml_is_named_as_such_and_nothing_changes(
        run_dir: Path, tmp_path: Path, content: bytes,
        capsys: pytest.CaptureFixture[str]) -> None:
    """Non-UTF-8 bytes were a UnicodeDecodeError; a valid file that is not a mapping was
    reported as 'started with another config (differs in batch_size, ...)'."""
    import shutil

    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    (run / "config.yaml").write_bytes(content)
    before = _files(run)
    why = "is not UTF-8 text (byte 0xff at offset 15)" if b"\xff" in content else \
        "must hold a mapping of keys"
    assert _one_line(["train", "--out", str(run), "--resume", "auto"], capsys) == \
        f"error: config file {run / 'config.yaml'} {why}"
    assert _one_line(["train", "--preset", "smoke", "--out", str(run), "--resume", "auto"],
                     capsys) == f"error: the run's config is unreadable (config file " \
        f"{run / 'config.yaml'} {why}); nothing was changed: restore it, or choose another --out"
    assert _one_line(["train", "--config", str(run / "config.yaml"),
                      "--out", str(tmp_path / "new")], capsys) == \
        f"error: config file {run / 'config.yaml'} {why}"
    assert _files(run) == before and not (tmp_path / "new").exists()


def test_absurd_iteration_counts_are_refused(capsys: pytest.CaptureFixture[str],
                                             tmp_path: Path) -> None:
    # --print-config: the same check, and a regression fails here instead of training
    # for ever (as it did)
    line = _one_line(["train", "--preset", "smoke", "--set", "schedule.iterations=1e26",
                      "--print-config", "--out", str(tmp_path / "x")], capsys)
    assert line == "error: schedule.iterations must be in [1, 1e+09], got " \
        "100000000000000004764729344"
    assert not (tmp_path / "x").exists()


def test_a_closed_pipe_ends_quietly(run_dir: Path) -> None:
    """`resnetlab eval RUN | head -2` was a BrokenPipeError traceback. The reader here has
    gone before the first line is written, so every write meets the closed pipe."""
    read, write = os.pipe()
    os.close(read)
    try:
        done = subprocess.run([sys.executable, "-m", "resnetlab", "eval", str(run_dir),
                               "--backend", "torch", "--precision", "fp32"], stdout=write,
                              stderr=subprocess.PIPE, text=True, timeout=300)
    finally:
        os.close(write)
    assert done.returncode == 141 and done.stderr == ""
