"""torchvision interop and the safetensors weights format."""

import json
import pickle
from pathlib import Path

import pytest
import torch
import torchvision

import resnetlab
from resnetlab.models.convert import TORCHVISION_PAIRS

from .test_convert import perturb


@pytest.mark.parametrize("tv_name", list(TORCHVISION_PAIRS))
def test_torchvision_state_dict_gives_same_logits_both_ways(tv_name: str) -> None:
    # Every BN its own statistics (fresh ones are all alike: two same-shaped BNs swapped by
    # the mapping would give equal logits), and an odd size (no stride hides an off-by-one).
    tv = perturb(getattr(torchvision.models, tv_name)(num_classes=10))
    ours = resnetlab.create_model(TORCHVISION_PAIRS[tv_name], num_classes=10).eval()
    ours.load_state_dict(resnetlab.from_torchvision(tv.state_dict()))
    x = torch.randn(2, 3, 97, 97)
    with torch.no_grad():
        assert torch.equal(ours(x), tv(x))
    # ...and back: fresh weights of ours into a fresh torchvision model.
    ours2 = resnetlab.create_model(TORCHVISION_PAIRS[tv_name], num_classes=10).eval()
    tv2 = getattr(torchvision.models, tv_name)(num_classes=10).eval()
    tv2.load_state_dict(resnetlab.to_torchvision(ours2.state_dict()))
    with torch.no_grad():
        assert torch.equal(ours2(x), tv2(x))
        assert not torch.equal(ours2(x), ours(x))


def test_safetensors_round_trip(tmp_path: Path) -> None:
    model = resnetlab.create_model("resnet20", in_chans=1, shortcut="B").eval()
    names = [f"class{i}" for i in range(10)]
    out = resnetlab.save_weights(model, tmp_path / "w", class_names=names, input_size=28)
    assert sorted(p.name for p in out.iterdir()) == ["config.json", "model.safetensors"]
    cfg = json.loads((out / "config.json").read_text())
    assert cfg["architecture"] == "resnet20" and cfg["overrides"] == {"shortcut": "B"}
    assert cfg["in_chans"] == 1 and cfg["num_classes"] == 10 and cfg["input_size"] == 28
    assert cfg["class_names"] == names and len(cfg["mean"]) == len(cfg["std"]) == 1
    for loaded in (resnetlab.create_model("resnet20", weights=out), resnetlab.load_model(out)):
        loaded.eval()
        x = torch.randn(3, 1, 28, 28)
        with torch.no_grad():
            assert torch.equal(loaded(x), model(x))
        assert loaded.model_config.class_names == names


def test_weights_of_other_architecture_are_refused(tmp_path: Path) -> None:
    resnetlab.save_weights(resnetlab.create_model("resnet20"), tmp_path)
    with pytest.raises(resnetlab.ConfigError, match="holds a resnet20"):
        resnetlab.create_model("resnet32", weights=tmp_path)
    with pytest.raises(resnetlab.ConfigError, match="num_classes=10"):
        resnetlab.create_model("resnet20", num_classes=100, weights=tmp_path)


def test_mismatched_tensors_name_the_problem(tmp_path: Path) -> None:
    resnetlab.save_weights(resnetlab.create_model("resnet20"), tmp_path)
    cfg = json.loads((tmp_path / "config.json").read_text())
    cfg["architecture"] = "resnet32"
    (tmp_path / "config.json").write_text(json.dumps(cfg))
    with pytest.raises(resnetlab.WeightsError, match=r"missing \(first: layer1\.3"):
        resnetlab.load_model(tmp_path)


def test_corrupted_or_pickled_weights_are_refused(tmp_path: Path) -> None:
    resnetlab.save_weights(resnetlab.create_model("resnet20"), tmp_path)
    data = (tmp_path / "model.safetensors").read_bytes()
    (tmp_path / "model.safetensors").write_bytes(data[: len(data) // 2])
    with pytest.raises(resnetlab.WeightsError, match="not a readable safetensors"):
        resnetlab.load_model(tmp_path)
    marker = tmp_path / "pwned"

    class Evil:
        def __reduce__(self):
            return (marker.touch, ())

    (tmp_path / "model.safetensors").write_bytes(pickle.dumps(Evil()))
    with pytest.raises(resnetlab.WeightsError):
        resnetlab.load_model(tmp_path)
    assert not marker.exists()


def test_missing_directory_says_so(tmp_path: Path) -> None:
    with pytest.raises(resnetlab.WeightsError, match="not a resnetlab weights directory"):
        resnetlab.load_model(tmp_path / "nope")
