"""Fine-tuning (`train --init`): every weight format read weights-only, the architecture
checked, the classifier re-initialised for another class count, frozen parts left exactly
as loaded, the backbone at its own lr."""

import json
import pickle
from pathlib import Path

import pytest
import timm
import torch
import torchvision
from safetensors.torch import save_file

import resnetlab
from resnetlab import kernels
from resnetlab.cli import main
from resnetlab.config import resolve
from resnetlab.train.finetune import init_from, read_source
from resnetlab.train.setup import make_optimizer

from .conftest import Variant
from .test_convert import perturb

FOLDER_SETS = ["--set", "data.dataset=folder", "--set", "data.image_size=32", "--set",
               "data.val_split=0", "--set", "data.workers=0", "--set", "batch_size=32",
               "--set", "eval_batch_size=64", "--set", "schedule.kind=constant",
               "--set", "schedule.iterations=4", "--set", "eval_every=4",
               "--set", "log_every=2", "--set", "precision=fp32"]  # fp32: the fused kernels


def _backbone(state: dict[str, torch.Tensor]) -> dict[str, torch.Tensor]:
    return {k: v for k, v in state.items() if not k.startswith("head.")}


def test_torchvision_file_with_a_frozen_backbone_trains_only_the_new_classifier(
        tmp_path: Path, folder_dir: Path, caplog: pytest.LogCaptureFixture,
        monkeypatch: pytest.MonkeyPatch) -> None:
    """A linear probe from a torchvision .pth (1000 classes) on a 10-class folder: the
    classifier is new and trained; every other tensor, BatchNorm statistics included,
    ends exactly as the file held it."""
    from resnetlab.train import setup

    load, heads = setup.init_from, []

    def recorded(model: torch.nn.Module, source: str, name: str) -> None:
        load(model, source, name)
        heads.append(model.head.fc.weight.detach().clone())  # the new classifier, untrained

    monkeypatch.setattr(setup, "init_from", recorded)
    tv = perturb(torchvision.models.resnet18())
    torch.save(tv.state_dict(), tmp_path / "resnet18.pth")
    out = tmp_path / "run"
    caplog.set_level("INFO")
    assert main(["train", "--config", "/dev/null", "--data-dir", str(folder_dir), *FOLDER_SETS,
                 "--set", "model.name=resnet18", "--init", str(tmp_path / "resnet18.pth"),
                 "--set", "finetune.freeze=backbone", "--out", str(out)]) == 0
    assert any("classifier re-initialised" in r.message and "1000 classes, this data 10"
               in r.message for r in caplog.records)
    # The frozen BatchNorms stay module calls in the fused-kernel rewrite, which applies.
    assert any(r.message == "fused BN-ReLU kernels: %s" % ("on" if kernels.available() else
                                                          "off") for r in caplog.records)
    final = resnetlab.load_model(out / "final").state_dict()
    source = resnetlab.from_torchvision(tv.state_dict())
    assert all(torch.equal(final[k], v) for k, v in _backbone(source).items())
    assert final["head.fc.weight"].shape == (10, 512) and len(heads) == 1
    assert not torch.equal(final["head.fc.weight"], heads[0])  # trained from there


def test_timm_file_and_hub_folder_load_exactly(tmp_path: Path) -> None:
    """A timm resnet18d as .pth, .safetensors and a Hugging Face style folder: the same
    logits as timm's model, the format and architecture told by the keys."""
    theirs = perturb(timm.create_model("resnet18d", num_classes=7))
    state = theirs.state_dict()
    torch.save({"state_dict": {f"module.{k}": v for k, v in state.items()}, "epoch": 3},
               tmp_path / "ckpt.pth")
    save_file({k: v.contiguous() for k, v in state.items()}, tmp_path / "w.safetensors")
    hub = tmp_path / "hub"
    hub.mkdir()
    save_file({k: v.contiguous() for k, v in state.items()}, hub / "model.safetensors")
    (hub / "config.json").write_text(json.dumps({"architecture": "resnet18d",
                                                 "num_classes": 7}))
    x = torch.randn(2, 3, 45, 45)
    for source in (tmp_path / "ckpt.pth", tmp_path / "w.safetensors", hub):
        _, fmt, arch = read_source(source)
        assert (fmt, arch) == ("torchvision/timm", "resnet18d")
        ours = resnetlab.create_model("resnet18d", num_classes=7)
        init_from(ours, source, "resnet18d")
        with torch.no_grad():
            assert torch.equal(ours.eval()(x), theirs(x))


@pytest.mark.stochastic(precisions=["fp32"])
def test_resnetlab_weights_and_a_grayscale_first_conv(tmp_path: Path, variant: Variant) -> None:
    """Images of the variant's seed; fp32 rounding is what the tolerance covers."""
    src = perturb(resnetlab.create_model("resnet20"))
    resnetlab.save_weights(src, tmp_path / "w")
    gray = resnetlab.create_model("resnet20", in_chans=1, num_classes=3)
    init_from(gray, tmp_path / "w", "resnet20")
    summed = src.state_dict()["stem.conv.weight"].sum(1, keepdim=True)
    assert torch.equal(gray.state_dict()["stem.conv.weight"], summed)
    x = torch.rand(2, 1, 32, 32)
    with torch.no_grad():  # a gray image is the RGB image with three equal channels (up to
        # the order of the first conv's sums: 0.59 of a 1e-4 tolerance at worst over seeds
        # 0-9, so 5e-4, 8x that; a first conv not summed is off by O(1))
        a = gray.eval().forward_features(x)
        b = src.eval().forward_features(x.expand(-1, 3, -1, -1))
    variant.record(diff_over_tolerance=float(((a - b).abs() / (5e-4 + 5e-4 * b.abs())).max()))
    torch.testing.assert_close(a, b, rtol=5e-4, atol=5e-4)


def test_wrong_architecture_and_unsafe_or_foreign_files_are_one_line(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    timm_d = timm.create_model("resnet50d").state_dict()
    torch.save(timm_d, tmp_path / "d.pth")
    with pytest.raises(resnetlab.ConfigError, match=r"holds a resnet50d .* model.name=resnet50d"):
        init_from(resnetlab.create_model("resnet50"), tmp_path / "d.pth", "resnet50")
    # torchvision's resnet50 strides on the 3x3: our resnet50b, not the paper's resnet50.
    torch.save(torchvision.models.resnet50().state_dict(), tmp_path / "tv50.pth")
    with pytest.raises(resnetlab.ConfigError, match="holds a resnet50b"):
        init_from(resnetlab.create_model("resnet50"), tmp_path / "tv50.pth", "resnet50")

    class Payload:
        def __reduce__(self) -> tuple[object, tuple[str]]:
            return (print, ("this must never run",))

    torch.save({"conv1.weight": Payload()}, tmp_path / "evil.pth")
    (tmp_path / "evil.pkl").write_bytes(pickle.dumps({"conv1.weight": Payload()}))
    for evil in ("evil.pth", "evil.pkl"):
        with pytest.raises(resnetlab.WeightsError, match="refused: it holds Python objects"):
            read_source(tmp_path / evil)
    assert "this must never run" not in capsys.readouterr().out
    (tmp_path / "cut.pth").write_bytes((tmp_path / "d.pth").read_bytes()[:5000])
    with pytest.raises(resnetlab.WeightsError, match="not a readable checkpoint"):
        read_source(tmp_path / "cut.pth")
    save_file({"encoder.weight": torch.zeros(2)}, tmp_path / "other.safetensors")
    with pytest.raises(resnetlab.WeightsError, match="no known ResNet layout"):
        read_source(tmp_path / "other.safetensors")
    with pytest.raises(resnetlab.WeightsError, match="does not exist"):
        read_source(tmp_path / "missing.pth")


def test_backbone_lr_and_frozen_parts(tmp_path: Path, folder_dir: Path) -> None:
    """finetune.backbone_lr scales every group but the classifier's; frozen parts leave the
    optimizer; a part name that does not exist is refused in one line."""
    cfg = resolve(None, settings=[{"model": {"name": "resnet20"}, "finetune": {
        "backbone_lr": 0.1, "freeze": "stem,stage1"}, "optim": {"decay_bn_and_bias": False}}])
    model = resnetlab.create_model("resnet20")
    from resnetlab.train.finetune import freeze

    assert freeze(model, cfg.finetune.freeze) == ["stem", "layer1"]
    opt = make_optimizer(model, cfg)
    head = {id(p) for p in model.head.parameters()}
    trained = {id(p) for g in opt.param_groups for p in g["params"]}
    assert trained == {id(p) for p in model.parameters() if p.requires_grad}
    assert not any(id(p) in trained for p in [*model.stem.parameters(),
                                              *model.layer1.parameters()])
    for g in opt.param_groups:
        assert g["lr_scale"] == (1.0 if {id(p) for p in g["params"]} <= head else 0.1)
    model.train()
    assert not model.layer1[0].bn1.training and model.layer2[0].bn1.training
    with pytest.raises(resnetlab.ConfigError, match="unknown part 'layer4'"):
        resolve(None, sets=["model.name=resnet20", "finetune.freeze=layer4"])
    # The loop applies the scale: with a backbone lr of 1e-9 the backbone barely moves.
    out = tmp_path / "run"
    src = perturb(resnetlab.create_model("resnet20", num_classes=10))
    resnetlab.save_weights(src, tmp_path / "w")
    assert main(["train", "--config", "/dev/null", "--data-dir", str(folder_dir), *FOLDER_SETS,
                 "--set", "model.name=resnet20", "--init", str(tmp_path / "w"), "--set",
                 "finetune.backbone_lr=1e-9", "--set", "optim.weight_decay=0",
                 "--out", str(out)]) == 0
    final = resnetlab.load_model(out / "final")
    before = dict(src.named_parameters())
    moved = {k: float((p - before[k]).detach().abs().max())
             for k, p in final.named_parameters()}
    assert max(v for k, v in moved.items() if not k.startswith("head.")) < 1e-6
    assert moved["head.fc.weight"] > 1e-4
