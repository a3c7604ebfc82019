"""Golden numbers from the paper and torchvision, and the structure each variant promises."""

import ast
from pathlib import Path

import pytest
import torch
from torch import nn

import resnetlab
from resnetlab.models import Bottleneck, Projection, ZeroPadShortcut
from resnetlab.models.complexity import count_params, meta_model, model_summary
from resnetlab.models.layers import conv3x3
from resnetlab.models.registry import PAPER_MACS

# torchvision's parameter counts and the CIFAR option-A counts (paper Table 6).
PARAMS = {
    "resnet18": 11_689_512, "resnet34": 21_797_672, "resnet50": 25_557_032,
    "resnet101": 44_549_160, "resnet152": 60_192_808,
    "resnet20": 269_722, "resnet32": 464_154, "resnet44": 658_586, "resnet56": 853_018,
    "resnet110": 1_727_962, "resnet1202": 19_421_274,
}
STATE_ENTRIES = {"resnet18": 122, "resnet34": 218, "resnet50": 320, "resnet101": 626,
                 "resnet152": 932}


@pytest.mark.parametrize("name", list(PARAMS))
def test_parameter_counts(name: str) -> None:
    assert count_params(meta_model(name)) == PARAMS[name]


@pytest.mark.parametrize("name", list(STATE_ENTRIES))
def test_state_dict_entries(name: str) -> None:
    assert len(meta_model(name).state_dict()) == STATE_ENTRIES[name]


@pytest.mark.parametrize("depth", [20, 32, 44, 56, 110])
def test_plain_cifar_twin_has_equal_parameters(depth: int) -> None:
    assert count_params(meta_model(f"plain{depth}")) == PARAMS[f"resnet{depth}"]


@pytest.mark.parametrize("name", list(PAPER_MACS))
def test_multiply_adds_match_paper_table1(name: str) -> None:
    macs = model_summary(name)["macs"]
    assert abs(macs - PAPER_MACS[name]) / PAPER_MACS[name] < 0.05


# torchvision's own figures for its (v1.5) nets, an independent source: GFLOPS as its
# weights' meta give them (multiply-adds, in 10^9), which 5% of Table 1 could not tell from
# v1's for ResNet-101/152 (the stride on the 3x3 adds 2.6% and 1.9%).
TORCHVISION_GMACS = {"resnet50b": 4.089, "resnet101b": 7.801, "resnet152b": 11.514}


@pytest.mark.parametrize("name", list(TORCHVISION_GMACS))
def test_v1_5_multiply_adds_are_torchvisions(name: str) -> None:
    assert model_summary(name)["macs"] / 1e9 == pytest.approx(TORCHVISION_GMACS[name], abs=5e-4)
    v1 = model_summary(name[:-1])["macs"] / 1e9
    assert TORCHVISION_GMACS[name] - v1 > 0.15  # v1 is told apart


def test_cifar_params_match_paper_table6_millions() -> None:
    table6 = {"resnet20": 0.27, "resnet32": 0.46, "resnet44": 0.66, "resnet56": 0.85,
              "resnet110": 1.7, "resnet1202": 19.4}
    for name, millions in table6.items():
        built = count_params(resnetlab.create_model(name))
        assert round(built / 1e6, 2 if millions < 1 else 1) == millions, name


def test_bottleneck_arithmetic_of_paper_sec_3_3() -> None:
    """A 256-channel bottleneck against two 3x3 layers of 256 channels: 16.9x fewer weights."""
    block = Bottleneck(256, 64)
    convs = sum(m.weight.numel() for m in block.modules() if isinstance(m, nn.Conv2d))
    plain = 2 * conv3x3(256, 256).weight.numel()
    assert convs == 69_632
    assert plain == 1_179_648
    assert round(plain / convs, 2) == 16.94


def _shortcuts(model: nn.Module) -> list[nn.Module]:
    return [b.shortcut for s in model.stages for b in s]


def test_shortcut_options_abc() -> None:
    a, b, c = (resnetlab.create_model("resnet34", shortcut=o) for o in "ABC")
    assert sum(isinstance(s, ZeroPadShortcut) for s in _shortcuts(a)) == 3
    assert sum(isinstance(s, Projection) for s in _shortcuts(a)) == 0
    assert sum(isinstance(s, Projection) for s in _shortcuts(b)) == 3
    assert all(isinstance(s, Projection) for s in _shortcuts(c))
    # Option A is parameter-free: ResNet-34 A has exactly the plain-34 parameters.
    assert count_params(a) == count_params(resnetlab.create_model("plain34"))
    assert count_params(a) < count_params(b) < count_params(c)
    assert all(s is None for s in _shortcuts(resnetlab.create_model("plain34")))


def test_option_a_zero_pads_subsampled_identity() -> None:
    x = torch.randn(2, 16, 8, 8)
    y = ZeroPadShortcut(16, 32, 2)(x)
    assert y.shape == (2, 32, 4, 4)
    assert torch.equal(y[:, :16], x[:, :, ::2, ::2])
    assert torch.count_nonzero(y[:, 16:]) == 0


def test_v1_stride_on_first_1x1_and_resnet_b_on_3x3() -> None:
    v1, b = resnetlab.create_model("resnet50"), resnetlab.create_model("resnet50b")
    assert v1.layer2[0].conv1.stride == (2, 2) and v1.layer2[0].conv2.stride == (1, 1)
    assert b.layer2[0].conv1.stride == (1, 1) and b.layer2[0].conv2.stride == (2, 2)
    assert count_params(v1) == count_params(b)


def test_resnet_c_deep_stem_and_d_average_pool_shortcut() -> None:
    c, d = resnetlab.create_model("resnet50c"), resnetlab.create_model("resnet50d")
    stem_convs = [m for m in c.stem if isinstance(m, nn.Conv2d)]
    assert [m.kernel_size for m in stem_convs] == [(3, 3)] * 3
    assert [m.out_channels for m in stem_convs] == [32, 32, 64]
    assert isinstance(d.layer2[0].shortcut.pool, nn.AvgPool2d)
    assert d.layer2[0].shortcut.conv.stride == (1, 1)
    assert isinstance(c.layer2[0].shortcut.pool, nn.Identity)
    assert c.layer2[0].conv2.stride == (2, 2)  # C and D include B


def test_preact_has_nothing_after_addition() -> None:
    model = resnetlab.create_model("preact_resnet110", zero_init_last=True).eval()
    block = model.layer1[1]
    x = torch.randn(2, 16, 8, 8)  # negative values survive: no ReLU after the addition
    assert torch.equal(block(x), x)
    assert isinstance(model.final_act[0], nn.BatchNorm2d)


@pytest.mark.parametrize("name", ["preact_resnet18", "cifar_preact_resnet20"])
def test_preact_first_unit_splits_after_its_activation(name: str) -> None:
    """v2: "the first activation right after conv1 and before splitting into two paths":
    the first unit's identity shortcut takes BN-ReLU of conv1's output, as its branch does;
    the next units' shortcuts take their raw input."""
    model = resnetlab.create_model(name).eval()
    seen: dict[str, torch.Tensor] = {}

    def keep(key: str) -> object:
        return lambda m, i, o: seen.__setitem__(key, (i[0] if key.endswith("in") else o).clone())

    first, second = model.layer1[0], model.layer1[1]
    assert isinstance(first.shortcut, nn.Identity)
    first.shortcut.register_forward_hook(keep("first_in"))
    first.register_forward_pre_hook(lambda m, i: seen.__setitem__("x", i[0].clone()))
    second.shortcut.register_forward_hook(keep("second_in"))
    second.register_forward_pre_hook(lambda m, i: seen.__setitem__("x2", i[0].clone()))
    with torch.no_grad():
        model(torch.randn(2, 3, 64, 64))
        torch.testing.assert_close(seen["first_in"], torch.relu(first.bn1(seen["x"])))
    assert (seen["x"] < 0).any()  # conv1's raw output, which the shortcut no longer carries
    assert torch.equal(seen["second_in"], seen["x2"])


def test_preact_weights_of_format_1_compute_what_they_were_trained_to(tmp_path: Path) -> None:
    """Saved before the first unit split after its activation: rebuilt as they were."""
    import json

    model = resnetlab.create_model("cifar_preact_resnet20", num_classes=3).eval()
    folder = resnetlab.save_weights(model, tmp_path / "w")
    cfg = json.loads((folder / "config.json").read_text())
    assert cfg["format_version"] == 2
    (folder / "config.json").write_text(json.dumps({**cfg, "format_version": 1}))
    old = resnetlab.load_model(folder).eval()
    assert not old.layer1[0].first
    model.layer1[0].first = False
    x = torch.randn(2, 3, 32, 32)
    with torch.no_grad():
        assert torch.equal(old(x), model(x))


def test_zero_init_last_makes_v1_blocks_identity() -> None:
    model = resnetlab.create_model("resnet56", zero_init_last=True).eval()
    x = torch.relu(torch.randn(2, 16, 8, 8))
    assert torch.equal(model.layer1[3](x), x)
    plain = resnetlab.create_model("resnet56")
    assert not torch.equal(plain.eval().layer1[3](x), x)
    with pytest.raises(resnetlab.ConfigError, match="plain"):
        resnetlab.create_model("plain20", zero_init_last=True)


def test_forward_features_head_and_stages() -> None:
    model = resnetlab.create_model("resnet50").eval()
    x = torch.randn(1, 3, 224, 224)
    with torch.no_grad():
        feats = model.forward_features(x)
        stages = model.forward_stages(x)
        assert torch.allclose(model.forward_head(feats), model(x))
    assert [tuple(s.shape[1:]) for s in stages] == [(256, 56, 56), (512, 28, 28),
                                                     (1024, 14, 14), (2048, 7, 7)]
    assert model.stage_channels == [256, 512, 1024, 2048]
    assert model.forward_head(feats, pre_logits=True).shape == (1, 2048)


def test_average_pool_shortcuts_keep_the_last_row_of_odd_maps() -> None:
    """ResNet-D's 2x2 average pool (and option A's, with avg_down) uses ceil_mode: a 7x7
    map gives 4x4, the shape the strided 3x3 conv of the residual branch gives, and the
    last row and column are averaged over the pixels that exist (count_include_pad off)."""
    x = torch.arange(49.0).view(1, 1, 7, 7)
    proj = Projection(1, 1, 2, avg_down=True, norm=False)
    with torch.no_grad():
        proj.conv.weight.fill_(1.0)
    y = proj(x)
    assert y.shape == (1, 1, 4, 4)
    assert y[0, 0, 0, 0] == (0 + 1 + 7 + 8) / 4 and y[0, 0, 3, 3] == 48  # the lone corner
    assert y[0, 0, 3, 0] == (42 + 43) / 2  # half a window: divided by 2, not 4
    z = ZeroPadShortcut(1, 2, 2, avg_down=True)(x)
    assert z.shape == (1, 2, 4, 4) and torch.equal(z[:, :1], y)
    branch = conv3x3(1, 1, 2)(x)
    assert branch.shape == y.shape  # so the residual addition lines up


def test_shortcut_defaults_are_the_papers_options_a_and_b() -> None:
    # Built bare, a shortcut is the paper's own (Table 3): A takes every second pixel and
    # appends zero channels; B is a strided 1x1 conv and a BN. The D pool is opt-in.
    x = torch.randn(2, 3, 5, 5)
    want = torch.cat([x[:, :, ::2, ::2], torch.zeros(2, 2, 3, 3)], 1)
    assert torch.equal(ZeroPadShortcut(3, 5, 2)(x), want)
    b = Projection(3, 5, 2)
    assert isinstance(b.pool, nn.Identity) and b.conv.stride == (2, 2)
    assert isinstance(b.bn, nn.BatchNorm2d)


def test_make_shortcut_passes_every_choice_on() -> None:
    from resnetlab.models.layers import make_shortcut

    a = make_shortcut("A", 3, 5, 2, avg_down=True, preact=False)
    assert isinstance(a, ZeroPadShortcut) and a.avg_down
    assert isinstance(make_shortcut("B", 3, 5, 2, avg_down=False, preact=True).bn, nn.Identity)
    with pytest.raises(ValueError, match=r"^shortcut must be one of \('A', 'B', 'C'\), got 'D'$"):
        make_shortcut("D", 3, 5, 2, avg_down=False, preact=False)
    x = torch.randn(1, 4, 6, 6)
    assert torch.equal(ZeroPadShortcut(4, 4, 2)(x), x[:, :, ::2, ::2])  # subsampling only
    with pytest.raises(ValueError, match=r"^option A cannot reduce channels \(4 -> 3\)$"):
        ZeroPadShortcut(4, 3, 1)


SRC = Path(resnetlab.__file__).parent.parent


def _imports(path: Path) -> set[str]:
    """Absolute names of the resnetlab modules a source file imports (relative ones resolved)."""
    package = ".".join(path.relative_to(SRC).parts[:-1])
    found = set()
    for node in ast.walk(ast.parse(path.read_text())):
        if isinstance(node, ast.ImportFrom):
            base = package.split(".")
            if node.level:
                base = base[:len(base) - node.level + 1]
                name = ".".join([*base, node.module] if node.module else base)
            else:
                name = node.module or ""
            found.add(name)
        elif isinstance(node, ast.Import):
            found.update(a.name for a in node.names)
    return {n for n in found if n.startswith("resnetlab")}


@pytest.mark.parametrize("layer", ["deploy", "serve", "evaluation", "models", "data"])
def test_lower_layers_do_not_import_the_trainer(layer: str) -> None:
    """Scoring, exporting and serving a run read its files through resnetlab.runs and
    resnetlab.config; the trainer sits above them (docs/architecture.md)."""
    files = sorted((SRC / "resnetlab" / layer).glob("*.py"))
    assert files
    wrong = {f.name: sorted(n for n in _imports(f) if n.startswith("resnetlab.train"))
             for f in files}
    assert {k: v for k, v in wrong.items() if v} == {}


def test_the_import_check_sees_relative_imports() -> None:
    """The check above reads `from ..train.loop import x` as resnetlab.train.loop."""
    names = _imports(SRC / "resnetlab" / "cli" / "run.py")
    assert "resnetlab.train.loop" in names
    assert "resnetlab.config" in names
