"""The model-information commands, as a user runs them."""

import subprocess
import sys

import pytest

from resnetlab.cli import main


def test_models_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["models", "resnet5*"]) == 0
    out = capsys.readouterr().out
    lines = [ln for ln in out.splitlines() if ln.startswith("resnet")]
    assert [ln.split()[0] for ln in lines] == ["resnet50", "resnet50b", "resnet50c",
                                               "resnet50d", "resnet56"]
    assert "25,557,032" in lines[0] and "3.86G" in lines[0]
    assert "853,018" in lines[-1] and "cifar" in lines[-1] and " A " in lines[-1]
    assert "multiply-accumulates" in out


def test_info_per_stage_table(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "resnet50"]) == 0
    out = capsys.readouterr().out
    rows = {ln.split()[0]: ln for ln in out.splitlines() if ln.split()}
    assert "conv4_x" in rows["layer3"] and "1024x14x14" in rows["layer3"]
    assert "2048x7x7" in rows["layer4"]
    assert "25,557,032" in rows["total"] and "3.86G" in rows["total"]
    assert "paper Table 1: 3.8e+09" in out


def test_info_options(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["info", "resnet20", "--in-chans", "1", "--input-size", "28",
                 "--num-classes", "5"]) == 0
    out = capsys.readouterr().out
    assert "input 1x28x28, 5 classes" in out and "64x7x7" in out


def test_wrong_model_is_one_line_with_exit_2() -> None:
    proc = subprocess.run([sys.executable, "-m", "resnetlab", "info", "resnt50"],
                          capture_output=True, text=True)
    assert proc.returncode == 2
    assert proc.stderr.strip().splitlines() == [
        "error: unknown model 'resnt50'; did you mean resnet50, resnet50d, resnet50c, resnet50b?"]
    assert "Traceback" not in proc.stderr
