"""The fused BN(+add)+ReLU kernels against float64 PyTorch, and the models that use them."""

import copy
import shutil
import subprocess
import sys

import pytest
import torch
import torch.nn.functional as F
from torch import nn

from resnetlab import kernels
from resnetlab.kernels.fuse import fuse_bn_act
from resnetlab.models.factory import create_model

from .conftest import Variant

needs_cc = pytest.mark.skipif(shutil.which("cc") is None and shutil.which("gcc") is None,
                              reason="no C compiler to build the kernels")

SHAPES = [(8, 16, 9, 7), (4, 64, 8, 8), (3, 20, 5, 5), (2, 3, 4, 6), (5, 40, 1, 1)]


def _cl(t: torch.Tensor) -> torch.Tensor:
    return t.contiguous(memory_format=torch.channels_last)


def _bn(c: int) -> nn.BatchNorm2d:
    bn = nn.BatchNorm2d(c)
    nn.init.normal_(bn.weight)
    nn.init.normal_(bn.bias)
    return bn


def _reference(bn: nn.BatchNorm2d, x: torch.Tensor, add: torch.Tensor | None):
    """float64 PyTorch on copies: output, grads of (x, weight, bias, add), the BN after."""
    bn64 = copy.deepcopy(bn).double()
    x64 = x.detach().double().requires_grad_()
    a64 = None if add is None else add.detach().double().requires_grad_()
    y = bn64(x64)
    y = F.relu(y if a64 is None else y + a64)
    return y, x64, a64, bn64


@needs_cc
@pytest.mark.parametrize("with_add", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_matches_float64(shape: tuple[int, ...], with_add: bool) -> None:
    assert kernels.available()
    x = _cl(torch.randn(shape) * 3 + 5).requires_grad_()
    add = _cl(torch.randn(shape)).requires_grad_() if with_add else None
    bn = _bn(shape[1])
    y_ref, x64, a64, bn64 = _reference(bn, x, add)
    assert kernels.usable(bn, x, add)
    y = kernels.bn_act(bn, x, add)
    assert y.is_contiguous(memory_format=torch.channels_last)
    torch.testing.assert_close(y.double(), y_ref, rtol=1e-5, atol=1e-5)

    g = torch.randn(shape)
    ours = torch.autograd.grad(y, [x, bn.weight, bn.bias] + ([add] if with_add else []), g)
    ref = torch.autograd.grad(y_ref, [x64, bn64.weight, bn64.bias] + ([a64] if with_add else []),
                              g.double())
    for name, a, b in zip(("x", "weight", "bias", "add"), ours, ref, strict=False):
        scale = b.abs().max().item() + 1.0
        assert (a.double() - b).abs().max().item() < 2e-5 * scale, name
    torch.testing.assert_close(bn.running_mean.double(), bn64.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), bn64.running_var, rtol=1e-5, atol=1e-6)
    assert bn.num_batches_tracked.item() == bn64.num_batches_tracked.item() == 1



BF16_ROUNDING = 2.0 ** -8  # twice bfloat16's worst relative rounding (8 bits kept)


@needs_cc
@pytest.mark.parametrize("with_add", [False, True])
@pytest.mark.parametrize("shape", SHAPES)
def test_fused_bf16_matches_float64(shape: tuple[int, ...], with_add: bool) -> None:
    """bfloat16 activations (bf16 autocast): computed in float and rounded once, so each
    output is float64's, from the same bfloat16 inputs, to bfloat16's rounding; the
    parameters' gradients and the statistics, kept in float32, to float32's."""
    x = _cl(torch.randn(shape) * 3 + 5).bfloat16().requires_grad_()
    add = _cl(torch.randn(shape)).bfloat16().requires_grad_() if with_add else None
    bn = _bn(shape[1])
    y_ref, x64, a64, bn64 = _reference(bn, x, add)
    assert kernels.usable(bn, x, add)
    y = kernels.bn_act(bn, x, add)
    assert y.dtype == torch.bfloat16 and y.is_contiguous(memory_format=torch.channels_last)
    scale = y_ref.abs().max().item() + 1.0
    torch.testing.assert_close(y.double(), y_ref, rtol=BF16_ROUNDING, atol=1e-5 * scale)

    g = torch.randn(shape).bfloat16()
    ours = torch.autograd.grad(y, [x, bn.weight, bn.bias] + ([add] if with_add else []), g)
    ref = torch.autograd.grad(y_ref, [x64, bn64.weight, bn64.bias] + ([a64] if with_add else []),
                              g.double())
    assert [t.dtype for t in ours] == [torch.bfloat16, torch.float32, torch.float32] + \
        [torch.bfloat16] * with_add
    for name, a, b in zip(("x", "weight", "bias", "add"), ours, ref, strict=False):
        rtol = BF16_ROUNDING if a.dtype == torch.bfloat16 else 0.0
        torch.testing.assert_close(a.double(), b, rtol=rtol, atol=2e-5 * (b.abs().max().item() + 1),
                                   msg=name)
    torch.testing.assert_close(bn.running_mean.double(), bn64.running_mean, rtol=1e-5, atol=1e-6)
    torch.testing.assert_close(bn.running_var.double(), bn64.running_var, rtol=1e-5, atol=1e-6)


@needs_cc
@pytest.mark.parametrize("with_add", [False, True])
def test_bf16_is_the_float32_kernel_rounded_once_as_pytorch_rounds(with_add: bool) -> None:
    """The bfloat16 path widens, runs the float32 arithmetic and rounds once: its outputs
    and gradients are bit for bit the float32 kernel's on the widened inputs, rounded by
    PyTorch's own conversion (to nearest, ties to even; NaN stays NaN)."""
    shape = (6, 24, 7, 5)
    x = _cl(torch.randn(shape) * 2 + 1).bfloat16()
    x[0, 3, 0, 0] = float("nan")  # NaN stays NaN through both
    add = _cl(torch.randn(shape)).bfloat16() if with_add else None
    g = _cl(torch.randn(shape)).bfloat16()
    bn, outs = _bn(shape[1]), []
    for dtype in (torch.bfloat16, torch.float32):
        xi = x.to(dtype).requires_grad_()
        ai = None if add is None else add.to(dtype).requires_grad_()
        y = kernels.bn_act(copy.deepcopy(bn), xi, ai)
        grads = torch.autograd.grad(y, [xi] + ([ai] if with_add else []), g.to(dtype))
        outs.append([y, *grads])
    for ours, wide in zip(*outs, strict=True):
        assert ours.dtype == torch.bfloat16
        torch.testing.assert_close(ours, wide.bfloat16(), rtol=0, atol=0, equal_nan=True)


@needs_cc
def test_second_derivatives_raise_rather_than_lie() -> None:
    x = _cl(torch.randn(2, 4, 3, 3)).requires_grad_()
    (gx,) = torch.autograd.grad(kernels.bn_act(_bn(4), x).pow(2).sum(), x, create_graph=True)
    with pytest.raises(RuntimeError):
        gx.sum().backward()


@needs_cc
def test_large_mean_does_not_cancel_the_variance() -> None:
    x = _cl(torch.randn(64, 8, 16, 16) * 0.01 + 1000.0)
    bn = _bn(8)
    y_ref = _reference(bn, x, None)[0]
    y = kernels.bn_act(bn, x)
    # the float32 input itself only holds ~6e-5 at 1000, i.e. 6e-3 of the std
    torch.testing.assert_close(y.double(), y_ref, rtol=0, atol=2e-2 * bn.weight.abs().max().item())


def test_usable_only_where_the_kernels_apply() -> None:
    bn, x = nn.BatchNorm2d(4), _cl(torch.randn(2, 4, 3, 3))
    expected = kernels.available()
    assert kernels.usable(bn, x) is expected
    assert not kernels.usable(bn, x.contiguous())  # NCHW
    assert not kernels.usable(bn, x.double())
    assert kernels.usable(bn, x.bfloat16()) is expected  # bf16 autocast's activations
    assert not kernels.usable(bn, x.bfloat16(), x)  # an addition of another dtype
    assert not kernels.usable(copy.deepcopy(bn).bfloat16(), x.bfloat16())  # bf16 parameters
    assert not kernels.usable(bn, _cl(torch.randn(1, 4, 1, 1)))  # one value per channel
    assert not kernels.usable(nn.BatchNorm2d(4, momentum=None), x)  # cumulative average
    assert not kernels.usable(nn.BatchNorm2d(4, affine=False), x)
    assert not kernels.usable(nn.SyncBatchNorm(4), x)
    assert not kernels.usable(copy.deepcopy(bn).eval(), x)
    hooked = copy.deepcopy(bn)
    hooked.register_forward_hook(lambda *a: None)
    assert not kernels.usable(hooked, x)


def _one_step(model: nn.Module, x: torch.Tensor, y: torch.Tensor):
    loss = F.cross_entropy(model(x.to(next(model.parameters()).dtype)), y)
    loss.backward()
    return loss.item(), {n: p.grad.double() for n, p in model.named_parameters()}


def _relative_error(grads: dict[str, torch.Tensor], exact: dict[str, torch.Tensor]) -> float:
    """|g - g_exact| / |g_exact| over all parameters as one vector."""
    diff = sum((grads[n] - exact[n]).square().sum() for n in exact) ** 0.5
    return float(diff / sum(g.square().sum() for g in exact.values()) ** 0.5)


# Gradients: an untrained net amplifies float32 rounding, with a heavy tail shared by every
# model (likely, not verified: a pre-activation within rounding of zero that passes the ReLU
# in one precision and not in the other). Over seeds 0-9 (AMD EPYC Zen 2) the relative
# gradient error was 1e-6 on most draws and at worst 3.1e-2 (resnet50); bounds fitted per
# model failed out of sample (plain20: 4.4e-6 at worst over seeds 0-9, then 2.7e-2 at seed
# 13). So one bound, GRAD = 0.1, 3.2x the worst draw of any model; each kernel on its own
# is held to 1e-5 of float64 above (test_fused_matches_float64).
GRAD = 0.1


@needs_cc
@pytest.mark.parametrize("name,size,pairs,fwd,grad", [
    ("resnet20", 16, 1 + 9 * 2, 1e-5, GRAD), ("plain20", 16, 1 + 9 * 2, 1e-5, GRAD),
    # the v2 stem is a bare conv; the final BN-ReLU before the head is the +1
    ("preact_resnet110", 8, 54 * 2 + 1, 1e-5, GRAD),
    # An untrained ResNet-50 amplifies float32 rounding in its loss and statistics too.
    ("resnet50", 32, 1 + 16 * 3, 1e-3, GRAD)],
    ids=["resnet20", "plain20", "preact_resnet110", "resnet50"])
@pytest.mark.stochastic(precisions=["fp32"])
def test_fused_model_is_as_exact_as_float32_allows(name: str, size: int, pairs: int,
                                                   fwd: float, grad: float,
                                                   variant: Variant) -> None:
    """One fused float32 training step against float64 (float32 kernels are what it
    tests, so it runs in no other precision). The bounds are fixed: PyTorch's own
    float32 step is no yardstick, its error depends on the CPU's ISA (its channels_last BN
    backward was off by 1% on ResNet-110 on an AVX2 EPYC). Loss and statistics stayed
    within 1/5 of `fwd` over the weights and inputs of seeds 0-9 (docs/testing.md)."""
    plain = create_model(name, num_classes=10).to(memory_format=torch.channels_last)
    exact, fused = copy.deepcopy(plain).double(), copy.deepcopy(plain)
    stepped = fuse_bn_act(fused)
    assert stepped is not None
    x, y = _cl(torch.randn(6, 3, size, size)), torch.randint(0, 10, (6,))
    calls = []
    op = kernels._forward
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "_forward", lambda *a: calls.append(1) or op(*a))
        loss_f, grads_f = _one_step(stepped, x, y)
    assert len(calls) == pairs, "every BN-ReLU pair of the model runs fused"
    loss_e, grads_e = _one_step(exact, x, y)
    stats = max(float((fused.state_dict()[n].double() - e).abs().max() / (e.abs().max() + 1))
                for n, e in exact.state_dict().items())
    variant.record(loss=abs(loss_f - loss_e) / abs(loss_e),
                   grads=_relative_error(grads_f, grads_e), statistics=stats)
    assert abs(loss_f - loss_e) <= fwd * abs(loss_e)
    assert _relative_error(grads_f, grads_e) <= grad
    assert stats <= fwd  # running statistics moved as in float64



@needs_cc
@pytest.mark.stochastic
def test_bf16_autocast_runs_every_pair_fused(variant: Variant) -> None:
    """Under bf16 autocast (`precision=bf16`, or `auto` on a CPU with native bf16) the
    convolutions hand the BNs bfloat16 batches, and every pair still runs fused. The loss
    of the untrained net is float64's to bfloat16's rounding: over seeds 0-9 (AMD Zen 4)
    at most 1.6e-3 relative (eager autocast: 2.5e-3), so the bound is 1e-2."""
    torch.manual_seed(variant.seed)
    model = create_model("resnet20", num_classes=10).to(memory_format=torch.channels_last)
    exact, stepped = copy.deepcopy(model).double(), fuse_bn_act(model)
    assert stepped is not None
    x, y = _cl(torch.randn(6, 3, 16, 16)), torch.randint(0, 10, (6,))
    calls = []
    op = kernels._forward
    with pytest.MonkeyPatch.context() as mp, torch.autocast("cpu", dtype=torch.bfloat16):
        mp.setattr(kernels, "_forward", lambda *a: calls.append(a[0].dtype) or op(*a))
        loss = F.cross_entropy(stepped(x).float(), y)
    assert calls == [torch.bfloat16] * (1 + 9 * 2)
    loss_e = F.cross_entropy(exact(x.double()), y).item()
    variant.record(loss=abs(loss.item() - loss_e) / loss_e)
    assert abs(loss.item() - loss_e) <= 1e-2 * loss_e

@needs_cc
def test_hooks_and_eval_mode_take_the_plain_path() -> None:
    model = create_model("resnet20", num_classes=10).to(memory_format=torch.channels_last)
    stepped = fuse_bn_act(model)
    assert stepped is not None
    x = _cl(torch.randn(2, 3, 8, 8))
    seen = []
    model.layer1[0].bn2.register_forward_hook(lambda m, i, o: seen.append(o.shape))
    calls = []
    op = kernels._forward
    with pytest.MonkeyPatch.context() as mp:
        mp.setattr(kernels, "_forward", lambda *a: calls.append(1) or op(*a))
        stepped(x)
        assert seen == [torch.Size([2, 16, 8, 8])]  # Fig. 7's layer responses rely on this
        assert len(calls) == 1 + 9 * 2 - 1  # all but the hooked BN run fused
        calls.clear()
        with torch.no_grad():
            assert torch.equal(stepped.eval()(x), model.eval()(x))
        assert not calls  # eval mode never fuses


def test_models_import_no_kernels_and_the_rewrite_shares_the_parameters() -> None:
    """The models are plain PyTorch; the trainer's rewrite steps the very parameters of the
    model, in its order (the optimizer, clipping and DDP see the same list)."""
    code = ("import sys, torch, resnetlab; m = resnetlab.create_model('resnet50d'); "
            "m(torch.randn(1, 3, 64, 64)); print('resnetlab.kernels' in sys.modules)")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True,
                         check=True).stdout
    assert out.strip() == "False"
    model = create_model("resnet50d", num_classes=10)
    stepped = fuse_bn_act(model)
    if stepped is None:
        pytest.skip("no C compiler")
    assert [id(p) for p in stepped.parameters()] == [id(p) for p in model.parameters()]


def test_no_compiler_falls_back(monkeypatch: pytest.MonkeyPatch, tmp_path, caplog) -> None:
    monkeypatch.setenv("CC", "/nonexistent/cc")
    monkeypatch.setenv("RESNETLAB_CACHE", str(tmp_path))
    kernels._library.cache_clear()
    try:
        assert not kernels.available()
        model = create_model("resnet20", num_classes=10).to(memory_format=torch.channels_last)
        assert fuse_bn_act(model) is None
        out = model(_cl(torch.randn(2, 3, 8, 8)))
        assert out.shape == (2, 10)
        assert "kernels unavailable" in caplog.text
    finally:
        monkeypatch.undo()
        kernels._library.cache_clear()


def test_kernels_are_built_once_per_source_and_cpu(tmp_path,
                                                    monkeypatch: pytest.MonkeyPatch) -> None:
    if shutil.which("cc") is None and shutil.which("gcc") is None:
        pytest.skip("no C compiler")
    monkeypatch.setenv("RESNETLAB_CACHE", str(tmp_path))
    folder = tmp_path / "kernels"
    kernels._library.cache_clear()
    try:
        assert kernels.available()
        (built,) = folder.glob("bn_act-*.so")
        mtime = built.stat().st_mtime_ns
        kernels._library.cache_clear()
        assert kernels.available()  # a second process: loaded, not rebuilt
        assert built.stat().st_mtime_ns == mtime
        monkeypatch.setattr(kernels, "_cpu_flags", lambda: "flags : another cpu")
        kernels._library.cache_clear()
        assert kernels.available()  # -march=native code is not reused on another CPU
        assert len(list(folder.glob("bn_act-*.so"))) == 2
    finally:
        monkeypatch.undo()
        kernels._library.cache_clear()


@needs_cc
@pytest.mark.parametrize("with_add", [False, True])
def test_kernels_are_registered_torch_ops(with_add: bool) -> None:
    """resnetlab::bn_act_forward/backward pass torch.library's own checks (schema, fake
    tensors, autograd registration, dispatch), and torch.compile traces them as ordinary
    ops with no graph break, giving what eager gives."""
    bn = _bn(6)
    x = _cl(torch.randn(4, 6, 5, 5)).requires_grad_()
    add = _cl(torch.randn(4, 6, 5, 5)).requires_grad_() if with_add else None
    args = (x, bn.weight, bn.bias, bn.running_mean.clone(), bn.running_var.clone(), add,
            0.1, 1e-5)
    torch.library.opcheck(kernels._forward, args,
                          test_utils=("test_schema", "test_faketensor",
                                      "test_autograd_registration"))

    def step(x: torch.Tensor, add: torch.Tensor | None) -> torch.Tensor:
        return kernels._forward(x, bn.weight, bn.bias, bn.running_mean, bn.running_var, add,
                                0.1, 1e-5)[0].square().sum()

    eager = torch.autograd.grad(step(x, add), [x, bn.weight])
    torch._dynamo.reset()
    compiled = torch.compile(step, fullgraph=True, backend="aot_eager")  # raises on a break
    got = torch.autograd.grad(compiled(x, add), [x, bn.weight])
    for a, b in zip(got, eager, strict=True):
        torch.testing.assert_close(a, b)
