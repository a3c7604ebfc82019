"""Golden tests of evaluation: expectations computed by hand, not by the code under test.

Each of these caught a single-line mutation that the older tests let through (issue 20):
top-5 taken as top-1, 10-crop without its upscale, multi-scale without its flips, BN
re-estimation without resetting the old statistics.
"""

import math

import pytest
import torch
import torchvision.transforms.v2.functional as TF
from torch import nn

from resnetlab.errors import ConfigError, ResNetLabError
from resnetlab.evaluation.evaluate import (
    PAPER_SCALES,
    EvalResult,
    evaluate,
    multiscale_probs,
    predict_probs,
    recompute_bn,
    ten_crop_probs,
)

# Seven classes; each row is one example's logits, chosen so that the labels below land at
# known ranks: 1st, 2nd, 6th, 1st, 2nd, 7th.
LOGITS = [
    [9.0, 1.0, 2.0, 3.0, 4.0, 5.0, 6.0],  # label 0: rank 1 (correct)
    [0.0, 5.0, 6.0, 1.0, 2.0, 3.0, 4.0],  # label 1: rank 2 (top-5 hit, top-1 miss -> 2)
    [6.0, 5.0, 1.0, 4.0, 3.0, 2.0, 0.0],  # label 2: rank 6 (top-5 miss, predicted 0)
    [0.0, 1.0, 2.0, 8.0, 3.0, 4.0, 5.0],  # label 3: rank 1 (correct)
    [0.0, 1.0, 2.0, 7.0, 6.5, 4.0, 5.0],  # label 4: rank 2 (predicted 3)
    [6.0, 5.0, 4.0, 3.0, 2.0, 1.0, 0.0],  # label 6: rank 7 (top-5 miss, predicted 0)
]
LABELS = [0, 1, 2, 3, 4, 6]


class Lookup(nn.Module):
    """Logits from the table above, indexed by the value of each image's first pixel."""

    def __init__(self) -> None:
        super().__init__()
        self.table = nn.Parameter(torch.tensor(LOGITS), requires_grad=False)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.table[x[:, 0, 0, 0].long()]


def _nll(row: list[float], label: int) -> float:
    return math.log(sum(math.exp(v) for v in row)) - row[label]


def test_evaluate_on_fixed_logits_matches_the_hand_count() -> None:
    images = torch.arange(6.0).view(6, 1, 1, 1).expand(6, 1, 2, 2).contiguous()
    labels = torch.tensor(LABELS)
    batches = [(images[:4], labels[:4]), (images[4:], labels[4:])]  # sums across batches
    res = evaluate(Lookup(), batches, num_classes=7)
    assert res.count == 6
    assert res.top1_error == pytest.approx(4 / 6, abs=1e-12)  # examples 1, 2, 4, 5 miss
    assert res.top5_error == pytest.approx(2 / 6, abs=1e-12)  # 2 and 5: outside the top 5
    want_nll = sum(_nll(r, y) for r, y in zip(LOGITS, LABELS, strict=True)) / 6
    assert math.isclose(res.loss, want_nll, rel_tol=1e-5)
    # Per class: 0 and 3 right, 1, 2, 4, 6 wrong, 5 never seen (no accuracy, not 0%).
    assert res.per_class_accuracy == [1.0, 0.0, 0.0, 1.0, 0.0, None, 0.0]
    want = [[0] * 7 for _ in range(7)]
    for true, pred in ((0, 0), (1, 2), (2, 0), (3, 3), (4, 3), (6, 0)):
        want[true][pred] += 1
    assert res.confusion == want
    assert all(type(v) is int for row in res.confusion for v in row)  # counts, in eval.json


class CertainOrNot(nn.Module):
    """Class 1 with certainty for an image of zeros, class 0 at e^3 : 1 for one of ones."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return torch.tensor([[0.0, 1000.0], [3.0, 0.0]])[x[:, 0, 0, 0].long()]


def test_summed_loss_keeps_small_batches_after_a_large_one() -> None:
    # 100,000 examples scored certain and wrong sum to 2.8 million (-log 1e-12 each, the
    # clamp); in float32 each later 0.049 would vanish into that sum: it is kept in float64.
    big = (torch.zeros(100_000, 1, 1, 1), torch.zeros(100_000, dtype=torch.long))
    small = [(torch.ones(1, 1, 1, 1), torch.zeros(1, dtype=torch.long))] * 1000
    res = evaluate(CertainOrNot(), [big, *small], num_classes=2)
    want = (100_000 * math.log(1e12) + 1000 * math.log1p(math.exp(-3))) / 101_000
    assert res.loss == pytest.approx(want, rel=2e-6)  # float32 sums: 1.8e-5 too low
    assert (res.top1_error, res.count) == (pytest.approx(100_000 / 101_000), 101_000)


def test_evaluate_reports_progress_and_refuses_nothing_to_score() -> None:
    seen: list[int] = []
    one = [(torch.ones(1, 1, 1, 1), torch.zeros(1, dtype=torch.long))]
    res = evaluate(CertainOrNot(), one * 3 + [(torch.zeros(2, 1, 1, 1), torch.ones(2).long())],
                   num_classes=2, progress=seen.append)
    assert seen == [1, 1, 1, 2] and res.count == 5 and res.top1_error == 0.0
    assert evaluate(CertainOrNot(), one, num_classes=2).count == 1  # a single image is enough
    # Nothing to score is the user's data, not a bug: a ResNetLabError, which the CLI prints
    # as one line saying what to check (it was a bare ValueError: a traceback).
    with pytest.raises(ResNetLabError, match=r"^evaluation got no examples: .*--data-dir") as e:
        evaluate(CertainOrNot(), [], num_classes=2)
    assert isinstance(e.value, ConfigError) and len(str(e.value).splitlines()) == 1


def test_the_model_device_is_where_its_parameters_are() -> None:
    from resnetlab.evaluation.evaluate import model_device

    assert model_device(nn.Linear(2, 2, device="meta")) == torch.device("meta")
    assert model_device(CertainOrNot()) == torch.device("cpu")  # no parameters at all


class Probe(nn.Module):
    """Logits that read different parts of the view and its scale: three corners, the mean,
    one interior pixel (which moves when the image is resized) and the width itself."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        width = torch.full_like(x[:, 0, 0, 0], x.shape[-1] / 100)
        return torch.stack([x[:, 0, 0, 0], x[:, 0, 0, -1], x[:, 0, -1, 0],
                            x.mean((1, 2, 3)), 4 * x[:, 0, 37, 91], width], 1)


def _image(size: int = 224) -> torch.Tensor:
    """Different everywhere: a squared ramp across plus a ramp down. At the paper's 224
    pixels, 256/224 and 257/224 or 256/225 give different sizes (256, 257, 255)."""
    i = torch.arange(float(size)) / (size - 1)
    return (i[None, :] ** 2 + i[:, None]).view(1, 1, size, size) / 2


def test_ten_crop_averages_the_ten_crops_of_the_upscaled_image() -> None:
    x = _image()
    big = TF.resize(x, [256], antialias=True)  # the shorter side to 224 * 256 / 224
    crops = [big[..., :224, :224], big[..., :224, 32:], big[..., 32:, :224],
             big[..., 32:, 32:], big[..., 16:240, 16:240]]  # the four corners and the centre
    views = crops + [c.flip(-1) for c in crops]
    want = torch.stack([Probe()(v).softmax(1) for v in views]).mean(0)
    torch.testing.assert_close(ten_crop_probs(Probe(), x), want)


@pytest.mark.parametrize("per_pixel", [False, True])
def test_ten_crop_of_small_images_takes_the_crops_training_took(per_pixel: bool) -> None:
    """Issue 16, item 8: 28-32 px images trained on crops of the zero-padded image are
    10-cropped the same way (the upscaling crop cost the demo 5 points). Built by hand: pad
    the raw pixels with zeros, cut the corners and the centre, then normalise each crop as
    the training loader does (per pixel: by its place in the crop)."""
    from resnetlab.data.memory import Normalize
    from resnetlab.evaluation.evaluate import PadCrop

    g = torch.Generator().manual_seed(0)
    raw = torch.randint(0, 256, (3, 2, 8, 8), generator=g).to(torch.uint8)
    mean = torch.rand(2, 8, 8, generator=g).tolist() if per_pixel else [0.3, 0.6]
    norm = Normalize(mean, [0.2, 0.4])
    padded = nn.functional.pad(raw, [2] * 4)  # uint8 zeros, as BatchAugment pads
    crops = [padded[..., :8, :8], padded[..., :8, 4:], padded[..., 4:, :8],
             padded[..., 4:, 4:], padded[..., 2:10, 2:10]]
    views = [norm(c) for c in crops] + [norm(c.flip(-1)) for c in crops]
    torch.testing.assert_close(views[4], norm(raw))  # the centre is the image itself
    want = torch.stack([Probe8()(v).softmax(1) for v in views]).mean(0)
    got = ten_crop_probs(Probe8(), norm(raw), PadCrop(2, norm.mean, norm.std))
    torch.testing.assert_close(got, want)
    assert not torch.allclose(ten_crop_probs(Probe8(), norm(raw)), want)


class Probe8(nn.Module):
    """Logits from the corner pixels, the mean and a ramp-weighted sum of an 8x8 image."""

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        ramp = torch.arange(64.0).view(8, 8) / 64
        return torch.stack([x[:, 0, 0, 0], x[:, 1, -1, -1], x.mean((1, 2, 3)),
                            (x[:, 0] * ramp).sum((1, 2)) / 8], 1)


def test_multiscale_averages_every_scale_and_its_flip() -> None:
    x = _image()
    views = []
    for s in PAPER_SCALES:  # the shorter side to each of the paper's sizes
        xi = TF.resize(x, [s], antialias=True) if s != 224 else x
        views += [xi, xi.flip(-1)]
    assert len(views) == 10
    want = torch.stack([Probe()(v).softmax(1) for v in views]).mean(0)
    torch.testing.assert_close(multiscale_probs(Probe(), x), want)
    # The default view is the plain one (paper sec. 3.4's single-crop numbers).
    torch.testing.assert_close(predict_probs(Probe(), x), Probe()(x).softmax(1))
    with pytest.raises(ValueError, match=r"tta must be one of .*'center', 'flip', '10crop'"):
        predict_probs(Probe(), x, "5crop")


def test_multiscale_and_ten_crop_scale_the_shorter_side_of_a_wide_image() -> None:
    # A whole image is scored fully convolutionally at any aspect: the scale is that of its
    # shorter side (here the height), as the paper's {224, ..., 640} are shorter sides.
    x = _image(300)[..., :224, :]  # 224 high, 300 wide
    views = [TF.resize(x, [round(224 * r)], antialias=True) for r in (1.5, 2.0)]
    views += [v.flip(-1) for v in views]
    assert views[0].shape[-2:] == (336, 450)
    want = torch.stack([Probe()(v).softmax(1) for v in views]).mean(0)
    torch.testing.assert_close(multiscale_probs(Probe(), x, scales=[1.5, 2.0]), want)
    big = TF.resize(x, [256], antialias=True)  # 256 x 342: crops of 224, the shorter side
    crops = [big[..., :224, :224], big[..., :224, -224:], big[..., -224:, :224],
             big[..., -224:, -224:], big[..., 16:240, 59:283]]
    views = crops + [c.flip(-1) for c in crops]
    want = torch.stack([Probe()(v).softmax(1) for v in views]).mean(0)
    torch.testing.assert_close(ten_crop_probs(Probe(), x), want)


def test_multiscale_below_the_native_size_antialiases() -> None:
    # A shrunken view is low-pass filtered first, or fine detail aliases. The paper's
    # scales only enlarge, where torchvision's antialias changes nothing; a user's may not.
    x = torch.rand(1, 1, 224, 224, generator=torch.Generator().manual_seed(0))
    small = TF.resize(x, [112], antialias=True)
    want = torch.stack([Probe()(v).softmax(1) for v in (small, small.flip(-1))]).mean(0)
    torch.testing.assert_close(multiscale_probs(Probe(), x, scales=[0.5]), want)
    aliased = TF.resize(x, [112], antialias=False)
    assert (Probe()(aliased) - Probe()(small)).abs().max() > 0.05  # the probe tells them apart


def test_recompute_bn_gives_the_exact_average_of_the_batch_statistics() -> None:
    gen = torch.Generator().manual_seed(0)
    conv = nn.Conv2d(1, 4, 3, bias=False)
    model = nn.Sequential(conv, nn.BatchNorm2d(4))
    bn = model[1]
    model.eval()
    with torch.no_grad():  # a "trained" BN: other statistics, many batches behind it
        bn.running_mean.fill_(5.0)
        bn.running_var.fill_(9.0)
        bn.num_batches_tracked.fill_(1000)
    batches = [(torch.randn(3, 1, 6, 6, generator=gen) * (i + 1), torch.zeros(3))
               for i in range(4)]
    recompute_bn(model, batches)
    with torch.no_grad():
        outs = [conv(x) for x, _ in batches]
    n = outs[0].numel() // 4
    means = [o.mean((0, 2, 3)) for o in outs]
    # BatchNorm keeps the unbiased variance of each batch; equal batches average plainly.
    variances = [((o - m[None, :, None, None]) ** 2).sum((0, 2, 3)) / (n - 1)
                 for o, m in zip(outs, means, strict=True)]
    torch.testing.assert_close(bn.running_mean, torch.stack(means).mean(0))
    torch.testing.assert_close(bn.running_var, torch.stack(variances).mean(0))
    assert bn.momentum == 0.1 and not model.training  # the model is left as it was given


def test_recompute_bn_reads_the_first_max_batches_and_no_more() -> None:
    """Batch i holds {i, i + 1}: its mean is i + 0.5, so the running mean says exactly how
    many batches were read (the default is 200)."""
    batches = [(torch.tensor([i, i + 1.0]).view(2, 1, 1, 1), torch.zeros(2))
               for i in range(201)]
    for max_batches, want in ((None, 100.0), (3, 1.5)):
        bn = nn.BatchNorm2d(1)
        if max_batches is None:
            recompute_bn(bn, batches)
        else:
            recompute_bn(bn, batches, max_batches=max_batches)
        assert bn.running_mean.item() == pytest.approx(want)
        assert bn.num_batches_tracked.item() == (max_batches or 200)
        assert bn.momentum == 0.1  # restored after stopping early too


def test_report_holds_what_eval_json_promises() -> None:
    res = EvalResult(0.25, 0.0, 0.5, 4, [1.0, 0.5], [[1, 0], [1, 2]])
    assert res.report(["cat", "dog"], split="test") == {
        "split": "test", "top1_error": 0.25, "top5_error": 0.0, "loss": 0.5, "count": 4,
        "per_class_accuracy": {"cat": 1.0, "dog": 0.5}, "confusion": [[1, 0], [1, 2]]}
    with pytest.raises(ValueError):  # names that do not match the classes are refused
        res.report(["cat"])
