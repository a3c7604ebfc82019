"""Every registry entry builds, runs forward and backward, and has the right output shape."""

from pathlib import Path

import pytest
import torch

import resnetlab
from resnetlab.models.registry import MODELS

SLOW = {"resnet1202", "preact_resnet1001"}


def _params():
    for name in resnetlab.list_models():
        marks = [pytest.mark.slow] if name in SLOW else []
        yield pytest.param(name, marks=marks, id=name)


@pytest.mark.parametrize("name", list(_params()))
def test_forward_backward_shape(name: str) -> None:
    spec = MODELS[name]
    size = 64 if spec.family == "imagenet" else 32
    model = resnetlab.create_model(name, num_classes=7)
    x = torch.randn(2, 3, size, size)
    out = model(x)
    assert out.shape == (2, 7)
    assert torch.isfinite(out).all()
    out.logsumexp(1).sum().backward()
    grads = [p.grad for p in model.parameters()]
    assert all(g is not None and torch.isfinite(g).all() for g in grads)
    assert model.stem[0].weight.grad.abs().sum() > 0


def test_registry_has_every_family() -> None:
    names = set(resnetlab.list_models())
    for d in (18, 34, 50, 101, 152):
        assert {f"resnet{d}", f"plain{d}", f"resnet{d}c", f"resnet{d}d",
                f"preact_resnet{d}"} <= names
    assert {"resnet50b", "resnet101b", "resnet152b"} <= names
    assert {f"resnet{d}" for d in (20, 32, 44, 56, 110, 1202)} <= names
    assert {f"plain{d}" for d in (20, 32, 44, 56, 110)} <= names
    assert {"preact_resnet164", "preact_resnet1001"} <= names


def test_list_models_pattern() -> None:
    assert resnetlab.list_models("resnet5*") == ["resnet50", "resnet50b", "resnet50c",
                                                 "resnet50d", "resnet56"]
    assert resnetlab.list_models("nothing*") == []


def test_unknown_model_names_closest() -> None:
    with pytest.raises(resnetlab.UnknownModelError, match="did you mean resnet50"):
        resnetlab.create_model("resnt50")


def test_unknown_override_lists_valid_options() -> None:
    with pytest.raises(resnetlab.ConfigError, match="shortcut"):
        resnetlab.create_model("resnet20", shortcutt="B")
    with pytest.raises(resnetlab.ConfigError, match="one of"):
        resnetlab.create_model("resnet20", shortcut="D")


@pytest.mark.parametrize("depth", [21, 7, 2, 0, 111])
def test_cifar_depth_must_be_6n_plus_2(depth: int) -> None:
    with pytest.raises(resnetlab.ConfigError, match="6n\\+2"):
        resnetlab.cifar_resnet(depth)


def test_cifar_any_6n_plus_2_depth() -> None:
    model = resnetlab.cifar_resnet(14)  # n = 2, not in the registry
    assert [len(s) for s in model.stages] == [2, 2, 2]
    net = resnetlab.cifar_resnet(47, bottleneck=True, preact=True)
    assert net(torch.randn(2, 3, 32, 32)).shape == (2, 10)
    with pytest.raises(resnetlab.ConfigError, match="9n\\+2"):
        resnetlab.cifar_resnet(22, bottleneck=True)


def test_cifar_resnet_of_any_depth_saves_and_loads(tmp_path: Path) -> None:
    """Issue 16, item 12: the README's `cifar_resnet(74)` then `save_weights` failed."""
    model = resnetlab.cifar_resnet(74, plain=True, num_classes=3, in_chans=1, shortcut="B")
    with torch.no_grad():
        for p in model.parameters():
            p.add_(0.01 * torch.randn_like(p))
    resnetlab.save_weights(model, tmp_path / "w", class_names=["a", "b", "c"])
    back = resnetlab.load_model(tmp_path / "w")
    assert back.model_config.architecture == "cifar_plain74"
    assert [len(s) for s in back.stages] == [12, 12, 12]
    x = torch.randn(2, 1, 28, 28)
    model.eval(), back.eval()
    out = model(x)
    assert out.isfinite().all() and torch.equal(out, back(x))
    # the same name builds it directly, e.g. as a training config's model.name
    assert resnetlab.count_params(resnetlab.create_model("cifar_preact_resnet47_bottleneck")) \
        == resnetlab.count_params(resnetlab.cifar_resnet(47, preact=True, bottleneck=True))


def test_in_chans_and_num_classes() -> None:
    model = resnetlab.create_model("resnet20", in_chans=1, num_classes=3)
    assert model(torch.randn(2, 1, 28, 28)).shape == (2, 3)
    model = resnetlab.create_model("resnet50c", in_chans=1, num_classes=5)
    assert model(torch.randn(2, 1, 64, 64)).shape == (2, 5)
