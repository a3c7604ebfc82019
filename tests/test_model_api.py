"""What code written for timm or torchvision expects of a model: the classifier API,
pretrained_cfg, feature maps, gradient checkpointing, torch.export and torchvision's
feature extractor, swept over the registry."""

from pathlib import Path

import pytest
import torch
from torch import nn
from torch.export import Dim, export
from torchvision.models.feature_extraction import create_feature_extractor

import resnetlab
from resnetlab.models.registry import get_spec

# One model per code path (stem kind, block, v1/v2, plain, option A/B, ResNet-B/C/D, CIFAR
# bottleneck): the default suite exports these; `make test-slow` exports every model.
PATHS = {"resnet18", "resnet50", "resnet50b", "resnet50c", "resnet50d", "plain18",
         "preact_resnet18", "preact_resnet50", "resnet20", "plain20", "preact_resnet164"}
SWEEP = [pytest.param(n, marks=() if n in PATHS else pytest.mark.slow)
         for n in resnetlab.list_models()]


def _input(name: str, batch: int) -> torch.Tensor:
    size = get_spec(name).input_size
    return torch.randn(batch, 3, min(size, 64), min(size, 64))


@pytest.mark.parametrize("name", SWEEP)
def test_torch_export_with_a_dynamic_batch_and_the_feature_extractor(name: str) -> None:
    model = resnetlab.create_model(name).eval()
    if get_spec(name).depth > 1000:  # 500 random blocks overflow to NaN; start as identities
        model.zero_init_last()
    batch = Dim("batch", min=1, max=1024)
    program = export(model, (_input(name, 2),), dynamic_shapes={"x": {0: batch}})
    x = _input(name, 5)  # another batch size than the one traced
    with torch.no_grad():
        torch.testing.assert_close(program.module()(x), model(x))
        torch.testing.assert_close(torch.fx.symbolic_trace(model)(x), model(x))
        nodes = {f"layer{i}": f"c{i + 1}" for i in range(1, len(model.stage_names) + 1)}
        maps = create_feature_extractor(model, nodes)(x)
        ours = model.forward_intermediates(x, range(1, len(nodes) + 1), True)
    # The extractor's last stage is before a pre-activation net's final BN-ReLU.
    for got, want in zip(list(maps.values())[:-1], ours[:-1], strict=True):
        assert torch.equal(got, want)


def test_classifier_api_keeps_the_config_true(tmp_path: Path) -> None:
    model = resnetlab.create_model("resnet18")
    assert isinstance(model.get_classifier(), nn.Linear)
    model.reset_classifier(7)
    assert model.num_classes == model.model_config.num_classes == 7
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 7)
    resnetlab.save_weights(model, tmp_path / "a")
    assert resnetlab.load_model(tmp_path / "a").num_classes == 7
    # A head swapped by hand is saved as what it is, and loads.
    model.head.fc = nn.Linear(512, 5)
    resnetlab.save_weights(model, tmp_path / "b")
    back = resnetlab.load_model(tmp_path / "b")
    assert back.num_classes == 5 and torch.equal(back.head.fc.weight, model.head.fc.weight)
    model.head.fc = nn.Sequential(nn.Dropout(), nn.Linear(512, 5))
    with pytest.raises(resnetlab.ConfigError, match="reset_classifier"):
        resnetlab.save_weights(model, tmp_path / "c")
    # num_classes=0: pooled features, as timm; saved and loaded too.
    feats = resnetlab.create_model("resnet18", num_classes=0)
    assert feats(torch.randn(2, 3, 64, 64)).shape == (2, 512)
    model.reset_classifier(0)
    assert model(torch.randn(2, 3, 64, 64)).shape == (2, 512)
    resnetlab.save_weights(feats, tmp_path / "d")
    assert resnetlab.load_model(tmp_path / "d").num_classes == 0


def test_pretrained_cfg_is_what_predict_does() -> None:
    cfg = resnetlab.create_model("resnet50d").pretrained_cfg
    assert cfg["input_size"] == (3, 224, 224) and cfg["crop_pct"] == 0.875
    assert cfg["first_conv"] == "stem.conv1" and cfg["classifier"] == "head.fc"
    small = resnetlab.create_model("resnet20", in_chans=1).pretrained_cfg
    assert small["input_size"] == (1, 32, 32) and small["crop_pct"] == 1.0
    assert small["first_conv"] == "stem.conv" and len(small["mean"]) == 1


@pytest.mark.parametrize("name", ["resnet50", "preact_resnet18", "resnet20"])
def test_feature_info_features_only_and_intermediates_agree(name: str) -> None:
    model = resnetlab.create_model(name).eval()
    x = _input(name, 2)
    with torch.no_grad():
        final, maps = model.forward_intermediates(x)
        assert torch.equal(final, model.forward_features(x))
        for info, m in zip(model.feature_info, maps, strict=True):
            assert m.shape[1] == info["num_chs"]
            assert m.shape[-1] == x.shape[-1] // info["reduction"]
        feats = resnetlab.create_features(name, out_indices=(1, len(maps) - 1))
        feats.load_state_dict({k: v for k, v in model.state_dict().items()
                               if not k.startswith("head.")})
        got = feats.eval()(x)
        assert [torch.equal(a, b) for a, b in zip(got, [maps[1], maps[-1]], strict=True)] \
            == [True, True]
        assert [i["module"] for i in feats.feature_info] == ["layer1", model.stage_names[-1]]
        # timm's spelling builds the same backbone
        timm_style = resnetlab.create_model(name, features_only=True,
                                            out_indices=(1, len(maps) - 1))
        timm_style.load_state_dict(feats.state_dict())
        assert [torch.equal(a, b) for a, b in zip(timm_style.eval()(x), got, strict=True)] \
            == [True, True]
    with pytest.raises(ValueError, match="indices must be in"):
        model.forward_intermediates(x, [9])


def _saved_bytes(model: nn.Module, x: torch.Tensor) -> tuple[int, dict[str, torch.Tensor]]:
    """Bytes of the tensors autograd keeps for the backward pass, and the gradients."""
    total = 0

    def pack(t: torch.Tensor) -> torch.Tensor:
        nonlocal total
        total += t.numel() * t.element_size()
        return t

    model.zero_grad()
    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        loss = model(x).logsumexp(1).mean()
    loss.backward()
    return total, {k: p.grad.clone() for k, p in model.named_parameters()}


def test_grad_checkpointing_gives_equal_gradients_and_statistics_with_less_memory() -> None:
    """Measured: what autograd keeps drops by more than half on resnet56; gradients and
    the BatchNorm running statistics after the step equal the plain run's."""
    torch.manual_seed(0)
    a = resnetlab.create_model("resnet56").train()
    b = resnetlab.create_model("resnet56").train()
    b.load_state_dict(a.state_dict())
    b.set_grad_checkpointing()
    x = torch.randn(8, 3, 32, 32)
    kept_a, grads_a = _saved_bytes(a, x)
    kept_b, grads_b = _saved_bytes(b, x)
    assert kept_b < kept_a / 2
    for k, g in grads_a.items():
        torch.testing.assert_close(grads_b[k], g, rtol=1e-5, atol=1e-6)
    sa, sb = a.state_dict(), b.state_dict()
    assert all(torch.equal(sa[k], sb[k]) for k in sa if "running" in k or "tracked" in k)


def test_cifar_preact_bottlenecks_stride_on_the_first_1x1_as_the_authors_code() -> None:
    """Identity Mappings' CIFAR code subsamples on the first 1x1 of a bottleneck: same
    parameters as a 3x3 stride, fewer mult-adds: in the two downsampling blocks the first
    1x1 (64 -> 32 channels at 32x32, 128 -> 64 at 16x16: 2,097,152 mult-adds each at full
    size) runs at a quarter of the pixels, 2 x 3/4 x 2,097,152 = 3,145,728 fewer."""
    summary = resnetlab.model_summary("preact_resnet164")
    on_3x3 = resnetlab.model_summary("preact_resnet164", stride_in_3x3=True)
    assert summary["params"] == on_3x3["params"] == 1_703_258  # Identity Mappings' 1.7M
    assert on_3x3["macs"] - summary["macs"] == 2 * 3 * 2_097_152 // 4
    assert get_spec("preact_resnet164").arch["stride_in_3x3"] is False
    block = resnetlab.create_model("preact_resnet164").layer2[0]
    assert block.conv1.stride == (2, 2) and block.conv2.stride == (1, 1)
    assert get_spec("preact_resnet50").arch["stride_in_3x3"] is True  # timm's resnetv2
