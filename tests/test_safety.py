"""Nothing runs code from a file, and a failed save keeps the previous checkpoint."""

import os
import pickle
import re
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import resnetlab
from resnetlab.train.checkpoint import (
    CheckpointError,
    latest_checkpoint,
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
    return save_checkpoint(tmp_path / "ckpts", model, state, None, {}), model


def test_crafted_trainer_state_is_refused_without_running(tmp_path: Path) -> None:
    ckpt, model = _saved(tmp_path)
    assert load_checkpoint(ckpt, model)["iteration"] == 3
    marker = tmp_path / "pwned"
    with open(ckpt / "trainer_state.pt", "wb") as f:
        pickle.dump({"iteration": _Evil(marker)}, f, protocol=2)
    with pytest.raises(CheckpointError, match="cannot be loaded safely"):
        load_checkpoint(ckpt, model)
    assert not marker.exists()
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


@pytest.mark.skipif(os.geteuid() == 0, reason="root writes into read-only directories")
def test_read_only_directory_keeps_previous_checkpoint_unprivileged(tmp_path: Path) -> None:
    ckpt, model = _saved(tmp_path)
    os.chmod(tmp_path / "ckpts", 0o555)
    try:
        with pytest.raises(CheckpointError, match="previous checkpoint is kept"):
            save_checkpoint(tmp_path / "ckpts", model, {"iteration": 4}, None, {})
    finally:
        os.chmod(tmp_path / "ckpts", 0o755)
    assert latest_checkpoint(tmp_path / "ckpts") == ckpt


def test_failing_save_keeps_previous_checkpoint(tmp_path: Path,
                                                monkeypatch: pytest.MonkeyPatch) -> None:
    ckpt, model = _saved(tmp_path)

    def disk_full(*args: object, **kwargs: object) -> None:
        raise OSError(28, "No space left on device")

    monkeypatch.setattr("resnetlab.train.checkpoint.torch.save", disk_full)
    with pytest.raises(CheckpointError, match=r"No space left on device.*previous checkpoint"):
        save_checkpoint(tmp_path / "ckpts", model, {"iteration": 9}, None, {})
    assert latest_checkpoint(tmp_path / "ckpts") == ckpt
    state = load_checkpoint(ckpt, resnetlab.create_model("resnet8"))
    assert state["iteration"] == 3


BOMB = '''
import resource, sys, time
from PIL import Image
from resnetlab.images import ImageError, load_image
Image.new("1", (30000, 30000)).save(sys.argv[1])
before = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
t = time.perf_counter()
try:
    load_image(sys.argv[1])
except ImageError as e:
    print("refused", time.perf_counter() - t, before,
          resource.getrusage(resource.RUSAGE_SELF).ru_maxrss, e)
'''


def test_decompression_bomb_is_refused_fast_with_bounded_memory(tmp_path: Path) -> None:
    script = tmp_path / "bomb.py"
    script.write_text(BOMB)
    out = subprocess.run([sys.executable, str(script), str(tmp_path / "bomb.png")],
                         capture_output=True, text=True, timeout=120).stdout.split()
    assert out[0] == "refused"
    seconds, rss_before, rss_after = float(out[1]), int(out[2]), int(out[3])
    assert seconds < 1.0
    assert rss_after - rss_before < 50_000  # KiB: the 900-megapixel image was never decoded


def test_debug_flag_shows_the_traceback() -> None:
    plain = subprocess.run([sys.executable, "-m", "resnetlab", "train", "--preset", "nope"],
                           capture_output=True, text=True)
    debug = subprocess.run([sys.executable, "-m", "resnetlab", "train", "--preset", "nope",
                            "--debug"], capture_output=True, text=True)
    assert plain.returncode == 2 and "Traceback" not in plain.stderr
    assert len(plain.stderr.strip().splitlines()) == 1
    assert debug.returncode != 0 and "Traceback" in debug.stderr and "ConfigError" in debug.stderr
