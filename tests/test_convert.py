"""Converters both ways for timm (resnet incl. C/D, resnetv2) and akamaster's CIFAR ResNets:
equal logits on models with perturbed BatchNorm statistics at an odd input size."""

from pathlib import Path

import pytest
import timm
import torch
import torch.nn.functional as F
from torch import nn

import resnetlab
from resnetlab.models.convert import (
    from_akamaster,
    from_timm,
    is_akamaster,
    to_akamaster,
    to_timm,
)

from .conftest import Variant


def perturb(model: nn.Module, seed: int = 0) -> nn.Module:
    """Random BN statistics and affine terms: identity-like BNs would hide a channel mix-up."""
    g = torch.Generator().manual_seed(seed)
    for m in model.modules():
        if isinstance(m, nn.BatchNorm2d):
            m.running_mean.copy_(torch.randn(m.num_features, generator=g) * 0.2)
            m.running_var.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.weight.data.copy_(torch.rand(m.num_features, generator=g) + 0.5)
            m.bias.data.copy_(torch.randn(m.num_features, generator=g) * 0.2)
    return model.eval()


# (timm name, resnetlab name, to_timm arguments)
TIMM_PAIRS = [("resnet18", "resnet18", {}), ("resnet34d", "resnet34d", {"avg_down": True}),
              ("resnet50", "resnet50b", {}), ("resnet50c", "resnet50c", {}),
              ("resnet50d", "resnet50d", {"avg_down": True}),
              ("resnetv2_50", "preact_resnet50", {"preact": True})]


@pytest.mark.parametrize(("timm_name", "ours_name", "back"), TIMM_PAIRS,
                         ids=[p[0] for p in TIMM_PAIRS])
@pytest.mark.stochastic(precisions=["fp32"])
def test_timm_state_dicts_give_equal_logits_both_ways(timm_name: str, ours_name: str,
                                                      back: dict[str, bool],
                                                      variant: Variant) -> None:
    """Weights and inputs of the variant's seed; fp32, the precision both models run."""
    theirs = perturb(timm.create_model(timm_name, num_classes=10))
    ours = resnetlab.create_model(ours_name, num_classes=10).eval()
    ours.load_state_dict(from_timm(theirs.state_dict()))
    x = torch.randn(2, 3, 97, 97)

    def same(a: torch.Tensor, b: torch.Tensor) -> None:
        # timm's resnetv2 classifies with a 1x1 conv before pooling: the same sums in
        # another order, equal up to float rounding (6.5e-5 seen on logits of about 2; the
        # spread over 10 seeds, as a fraction of the tolerance: docs/testing.md); every
        # other pair is exact.
        if back.get("preact"):
            variant.record(diff_over_tolerance=float(((a - b).abs() / (1e-4 + 1e-4 * b.abs()))
                                                     .max()))
            torch.testing.assert_close(a, b, rtol=1e-4, atol=1e-4)
        else:
            assert torch.equal(a, b)

    with torch.no_grad():
        ref = theirs(x)
        same(ours(x), ref)
        # ...and back: ours with other random weights into a fresh timm model.
        ours2 = perturb(resnetlab.create_model(ours_name, num_classes=10), seed=1)
        theirs2 = timm.create_model(timm_name, num_classes=10).eval()
        theirs2.load_state_dict(to_timm(ours2.state_dict(), **back))
        same(theirs2(x), ours2(x))
        assert not torch.allclose(ours2(x), ref)


class AkamasterBlock(nn.Module):
    """akamaster/pytorch_resnet_cifar10's BasicBlock with its option A: subsample, then pad
    planes/4 zero channels on each side."""

    def __init__(self, in_planes: int, planes: int, stride: int) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(in_planes, planes, 3, stride, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(planes)
        self.conv2 = nn.Conv2d(planes, planes, 3, 1, 1, bias=False)
        self.bn2 = nn.BatchNorm2d(planes)
        self.pad = planes // 4 if stride != 1 or in_planes != planes else 0

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        out = self.bn2(self.conv2(F.relu(self.bn1(self.conv1(x)))))
        short = F.pad(x[:, :, ::2, ::2], (0, 0, 0, 0, self.pad, self.pad)) if self.pad else x
        return F.relu(out + short)


class AkamasterResNet(nn.Module):
    def __init__(self, n: int, num_classes: int = 10) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 16, 3, 1, 1, bias=False)
        self.bn1 = nn.BatchNorm2d(16)
        ch = 16
        for i, width in enumerate((16, 32, 64), 1):
            blocks = [AkamasterBlock(ch if j == 0 else width, width, 2 if i > 1 and j == 0
                                     else 1) for j in range(n)]
            self.add_module(f"layer{i}", nn.Sequential(*blocks))
            ch = width
        self.linear = nn.Linear(64, num_classes)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.relu(self.bn1(self.conv1(x)))
        x = self.layer3(self.layer2(self.layer1(x)))
        return self.linear(F.avg_pool2d(x, x.shape[3]).flatten(1))


@pytest.mark.parametrize("depth", [20, 32])
def test_akamaster_checkpoints_give_equal_logits_both_ways(depth: int) -> None:
    torch.manual_seed(0)
    theirs = perturb(AkamasterResNet((depth - 2) // 6))
    assert resnetlab.count_params(theirs) == resnetlab.count_params(
        resnetlab.create_model(f"resnet{depth}"))
    x = torch.randn(2, 3, 33, 33)
    ours = resnetlab.create_model(f"resnet{depth}").eval()
    state = theirs.state_dict()
    renamed_only = {k.replace("conv1.", "stem.conv.", 1) if k.startswith("conv1.") else k: v
                    for k, v in state.items()}
    ours.load_state_dict(from_akamaster(state))
    with torch.no_grad():
        ref = theirs(x)
        torch.testing.assert_close(ours(x), ref, rtol=1e-5, atol=1e-5)
        # Renaming alone is not enough: the zero channels sit elsewhere (the 0.76).
        plain = resnetlab.create_model(f"resnet{depth}").eval()
        plain.load_state_dict({**from_akamaster(state), **{
            k: v for k, v in renamed_only.items() if k.startswith("layer")}})
        assert (plain(x) - ref).abs().max() > 1e-2
        ours2 = perturb(resnetlab.create_model(f"resnet{depth}"), seed=1)
        theirs2 = AkamasterResNet((depth - 2) // 6).eval()
        theirs2.load_state_dict(to_akamaster(ours2.state_dict()))
        torch.testing.assert_close(theirs2(x), ours2(x), rtol=1e-5, atol=1e-5)
        assert set(to_akamaster(ours2.state_dict())) == set(state)


def test_akamaster_checkpoint_as_its_trainer_saves_it(tmp_path: Path) -> None:
    """akamaster's trainer saves {'epoch', 'state_dict', 'best_prec1'} of a DataParallel
    model, so every key starts with `module.`; from_akamaster raised KeyError on them."""
    torch.manual_seed(0)
    theirs = perturb(AkamasterResNet(3))  # resnet20
    wrapped = nn.DataParallel(theirs)  # on a CPU a pass-through, with DataParallel's names
    path = tmp_path / "resnet20-12fca82f.th"
    torch.save({"epoch": 200, "state_dict": wrapped.state_dict(), "best_prec1": 91.7}, path)
    checkpoint = torch.load(path, map_location="cpu", weights_only=True)
    assert all(k.startswith("module.") for k in checkpoint["state_dict"])
    assert is_akamaster(checkpoint["state_dict"])
    ours = resnetlab.create_model("resnet20").eval()
    ours.load_state_dict(from_akamaster(checkpoint["state_dict"]))  # strict: every key
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        torch.testing.assert_close(ours(x), theirs(x), rtol=1e-5, atol=1e-5)
    # Another kind of state is one line saying what to pass, not a KeyError.
    with pytest.raises(resnetlab.WeightsError, match=r"^not an akamaster CIFAR ResNet"):
        from_akamaster(resnetlab.create_model("resnet20").state_dict())
