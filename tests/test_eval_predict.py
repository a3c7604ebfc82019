"""Evaluation (single view, 10-crop, multi-scale, BN re-estimation) and prediction."""

import io
import json
import shutil
from pathlib import Path
from typing import Any

import numpy as np
import pytest
import torch
from PIL import Image

import resnetlab
from resnetlab.cli import main
from resnetlab.config import resolve
from resnetlab.data import build_data
from resnetlab.data.images import ImageError, load_image
from resnetlab.data.memory import Normalize
from resnetlab.errors import ConfigError
from resnetlab.evaluation.evaluate import PadCrop, evaluate, recompute_bn


def test_evaluate_counts_errors() -> None:
    class Fixed(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.eye(3)[x[:, 0, 0, 0].long()] * 10

    x = torch.tensor([0, 1, 2, 2]).float().view(4, 1, 1, 1)
    y = torch.tensor([0, 1, 1, 2])
    res = evaluate(Fixed(), [(x, y)], 3)
    assert res.top1_error == 0.25 and res.count == 4
    assert res.per_class_accuracy == [1.0, 0.5, 1.0]
    assert res.confusion == [[1, 0, 0], [0, 1, 1], [0, 0, 1]]


def test_top1_and_top5_break_ties_alike() -> None:
    """A classifier that ties every class (collapsed, zero-initialised): an example is never
    a top-1 hit and a top-5 miss (argmax took class 0, topk left it out of 5 of 16)."""
    class Flat(torch.nn.Module):
        def forward(self, x: torch.Tensor) -> torch.Tensor:
            return torch.zeros(len(x), 16)

    res = evaluate(Flat(), [(torch.zeros(8, 1, 2, 2), torch.zeros(8, dtype=torch.long))], 16)
    assert res.top5_error <= res.top1_error


def test_recompute_bn_refuses_to_score_with_no_batches_seen() -> None:
    model = resnetlab.create_model("resnet8", num_classes=2)
    with pytest.raises(ConfigError, match="no training images"):
        recompute_bn(model, [])


def test_the_mirror_of_a_per_pixel_normalised_image_is_that_of_its_pixels() -> None:
    """Training flips the pixels, then takes off the per-pixel mean (normalize: pixel)."""
    gen = torch.Generator().manual_seed(0)
    raw = torch.rand(2, 3, 4, 4, generator=gen)
    mean, std = torch.rand(3, 4, 4, generator=gen), torch.full((3, 1, 1), 0.5)
    crop = PadCrop(4, mean, std)
    got = crop.flip((raw - mean) / std)
    torch.testing.assert_close(got, (raw.flip(-1) - mean) / std)
    assert not torch.allclose(got, ((raw - mean) / std).flip(-1))


def test_recompute_bn_reads_the_unaugmented_training_images(
        run_dir: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """What --recompute-bn feeds the model are the training images as scored (no crop, no
    flip), in a fixed shuffled order, not the augmented training batches."""
    from resnetlab.evaluation import run as eval_run
    from resnetlab.runs import run_data

    fed: list[torch.Tensor] = []
    real = eval_run.recompute_bn

    def spy(model: torch.nn.Module, batches: Any) -> None:
        def seen() -> Any:
            for x, y in batches:
                fed.append(x)
                yield x, y
        real(model, seen())

    monkeypatch.setattr(eval_run, "recompute_bn", spy)
    eval_run.evaluate_run(run_dir, "val", recompute=True, batch_size=64,
                          out=tmp_path / "bn.json")
    want = [x for x, _ in run_data(run_dir, 64).train_eval.batches(0)]
    assert len(fed) == len(want) and all(torch.equal(a, b) for a, b in zip(fed, want, strict=True))
    augmented = next(iter(run_data(run_dir, 64).train.batches(0)))[0]
    assert not any(torch.equal(augmented, x[:len(augmented)]) for x in fed)


def test_eval_cli_scores_each_tta_mode_and_recomputed_bn(
        run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """The CLI's numbers are the library's: each mode scored on the run's own test split
    equals `evaluate` called directly with that mode, and the modes differ."""
    model = resnetlab.load_model(run_dir / "final")
    saved = json.loads((run_dir / "final" / "config.json").read_text())
    cfg = resolve(None, str(run_dir / "config.yaml"))
    data = build_data(cfg.data, 64, 64, 0, stats=(saved["mean"], saved["std"]))
    norm = Normalize(saved["mean"], saved["std"])
    pad_crop = PadCrop(cfg.data.pad, norm.mean, norm.std)  # 10-crop as training cropped
    assert cfg.data.pad > 0
    losses = {}
    for tta in ("center", "10crop", "multiscale"):
        assert main(["eval", str(run_dir), "--tta", tta, "--backend", "torch",
                     "--precision", "fp32"]) == 0
        assert "top-1 error" in capsys.readouterr().out
        result = json.loads((run_dir / "final" / f"eval-test-{tta}.json").read_text())
        want = evaluate(model, data.test.batches(0), 10, tta=tta, pad_crop=pad_crop)
        assert result["count"] == 256 and result["tta"] == tta
        assert result["top1_error"] == pytest.approx(want.top1_error, abs=1e-9)
        assert result["loss"] == pytest.approx(want.loss, rel=1e-5)
        assert (run_dir / "final" / f"eval-test-{tta}.png").exists()
        losses[tta] = result["loss"]
    assert len({round(v, 6) for v in losses.values()}) == 3  # three different averages
    assert losses["center"] == pytest.approx(
        json.loads((run_dir / "eval.json").read_text())["loss"], rel=1e-5)
    # --recompute-bn re-estimates the statistics from the training split: other numbers.
    plain, recomputed = tmp_path / "plain.json", tmp_path / "bn.json"
    assert main(["eval", str(run_dir), "--split", "val", "--backend", "torch", "--precision",
                 "fp32", "--out", str(plain)]) == 0
    assert main(["eval", str(run_dir), "--split", "val", "--recompute-bn", "--out",
                 str(recomputed)]) == 0
    a, b = json.loads(plain.read_text()), json.loads(recomputed.read_text())
    assert a["count"] == b["count"] == 128 and b["recompute_bn"] is True
    assert a["loss"] != pytest.approx(b["loss"], rel=1e-6)
    # By default beside the weights, under a name of its own: the plain report stays.
    plain_default = run_dir / "final" / "eval-test-center.json"
    kept = plain_default.read_bytes()
    assert main(["eval", str(run_dir), "--recompute-bn"]) == 0
    assert json.loads((run_dir / "final" / "eval-test-center-recomputed-bn.json").read_text()
                      )["recompute_bn"] is True
    assert plain_default.read_bytes() == kept
    # --out replaces an earlier report of these weights, nothing else: not the trainer's
    # eval.json (its training time is in no other file), nor a figure beside the report.
    assert main(["eval", str(run_dir), "--split", "val", "--out", str(plain)]) == 0
    link = tmp_path / "the-same-run"  # the same weights under another name
    link.symlink_to(run_dir)
    assert main(["eval", str(link), "--split", "val", "--out", str(plain)]) == 0
    trained = (run_dir / "eval.json").read_bytes()
    figure = tmp_path / "mine.png"
    figure.write_bytes(b"a figure")
    for taken in (run_dir / "eval.json", tmp_path / "mine.json"):
        assert main(["eval", str(run_dir), "--split", "val", "--out", str(taken)]) == 2
        assert "choose another --out, or move it away" in capsys.readouterr().err
    assert (run_dir / "eval.json").read_bytes() == trained
    assert figure.read_bytes() == b"a figure" and not (tmp_path / "mine.json").exists()


def test_eval_bare_weights_need_data(run_dir: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    bare = tmp_path / "w"
    resnetlab.save_weights(resnetlab.load_model(run_dir / "final"), bare)
    assert main(["eval", str(bare)]) == 2
    assert "--data" in capsys.readouterr().err


def _image_files(d: Path) -> dict[str, Path]:
    rng = np.random.default_rng(0)
    rgb = Image.fromarray(rng.integers(0, 255, (40, 30, 3), dtype=np.uint8), "RGB")
    files = {}

    def save(name: str, im: Image.Image, **kw: object) -> None:
        files[name] = d / name
        im.save(files[name], **kw)

    save("rgb.jpg", rgb)
    save("gray.png", rgb.convert("L"))
    save("rgba.png", rgb.convert("RGBA"))
    pal = rgb.convert("P")
    save("palette.png", pal, transparency=0)
    save("cmyk.jpg", rgb.convert("CMYK"))
    save("deep16.png", Image.fromarray(rng.integers(0, 65535, (20, 20), dtype=np.uint16)))
    save("tiny.png", Image.new("RGB", (1, 1), (255, 0, 0)))
    save("image.webp", rgb)
    save("image.bmp", rgb)
    exif = Image.Exif()
    exif[0x0112] = 6  # orientation: rotate 90 degrees clockwise
    save("rotated.jpg", rgb, exif=exif)
    return files


def test_16_bit_images_keep_their_brightness_relative_to_each_other(tmp_path: Path) -> None:
    """Two dim 16-bit frames peaking at 255 and 256 come out equally dim (a per-image
    guess of the range used to make the first 257 times brighter)."""
    seen = []
    for top in (255, 256):
        path = tmp_path / f"peak{top}.png"
        Image.fromarray(np.full((8, 8), top, np.uint16)).save(path)
        seen.append(int(np.asarray(load_image(path, "L")).max()))
    assert seen == [1, 1]  # 255 and 256 of 65535, in 8 bits


def test_a_malformed_exif_block_leaves_the_image_unrotated(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """Pillow's exif_transpose has raised TypeError, IndexError, struct.error on phones'
    EXIF; the image is then used as stored, not lost (nor the run with it)."""
    from PIL import ImageOps

    path = _image_files(tmp_path)["rotated.jpg"]
    monkeypatch.setattr(ImageOps, "exif_transpose", lambda im: (_ for _ in ()).throw(
        TypeError("unhashable type")))
    assert load_image(path, "RGB").size == (30, 40)  # as stored: not turned


def test_every_image_mode_is_converted(tmp_path: Path) -> None:
    files = _image_files(tmp_path)
    for name, path in files.items():
        for mode in ("RGB", "L"):
            im = load_image(path, mode)
            assert im.mode == mode, name
    assert load_image(files["rotated.jpg"]).size == (40, 30)  # 30x40 turned upright
    deep = np.asarray(load_image(files["deep16.png"], "L"))
    assert deep.max() > 200 and deep.min() < 50  # scaled, not clipped to white


def test_transparency_is_flattened_onto_black(tmp_path: Path) -> None:
    """RGBA, LA and palette transparency composite over black, what the training images
    (Fashion-MNIST's black background) look like, instead of exposing the hidden colour."""
    rgba = np.zeros((2, 3, 4), dtype=np.uint8)
    rgba[:, 0] = (255, 0, 0, 0)  # red, fully transparent
    rgba[:, 1] = (0, 0, 255, 255)  # blue, opaque
    rgba[:, 2] = (0, 200, 0, 128)  # green, half transparent
    Image.fromarray(rgba, "RGBA").save(tmp_path / "a.png")
    got = np.asarray(load_image(tmp_path / "a.png"))
    assert got[0, 0].tolist() == [0, 0, 0] and got[0, 1].tolist() == [0, 0, 255]
    assert got[0, 2, 0] == got[0, 2, 2] == 0 and abs(int(got[0, 2, 1]) - 100) <= 1
    la = Image.fromarray(np.array([[[255, 0], [255, 255]]], dtype=np.uint8), "LA")
    la.save(tmp_path / "la.png")
    assert np.asarray(load_image(tmp_path / "la.png", "L")).tolist() == [[0, 255]]
    pal = Image.new("P", (2, 1))
    pal.putpalette([255, 255, 255, 10, 20, 30])
    pal.putpixel((0, 0), 0)
    pal.putpixel((1, 0), 1)
    pal.save(tmp_path / "p.png", transparency=0)  # index 0 (white) is transparent
    assert np.asarray(load_image(tmp_path / "p.png")).tolist() == [[[0, 0, 0], [10, 20, 30]]]


def test_bad_files_get_one_line_errors(tmp_path: Path) -> None:
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "text.png").write_text("hello")
    buf = io.BytesIO()
    Image.new("RGB", (64, 64), (1, 2, 3)).save(buf, "JPEG")
    (tmp_path / "cut.jpg").write_bytes(buf.getvalue()[:200])
    for name in ("empty.jpg", "text.png", "cut.jpg", "missing.png"):
        with pytest.raises(ImageError, match=name):
            load_image(tmp_path / name)


def test_decompression_bomb_is_refused_fast(tmp_path: Path) -> None:
    bomb = tmp_path / "bomb.png"
    Image.new("1", (30000, 30000)).save(bomb)  # ~100 KB on disk, 900 Mpx decoded
    assert bomb.stat().st_size < 2_000_000
    # Pillow refuses this one in Image.open, before our check: the same words and limit
    # as ours all the same (issue 16, item 5), not Pillow's own.
    with pytest.raises(ImageError, match=r"bomb\.png: 900,000,000 pixels is more than "
                       r"64,000,000; refusing a possible decompression bomb$"):
        load_image(bomb)


def test_predict_cli_every_mode_and_bad_files(run_dir: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    files = _image_files(tmp_path)
    (tmp_path / "bad.png").write_text("not an image")
    (tmp_path / "empty.jpg").write_bytes(b"")
    (tmp_path / "cut.jpg").write_bytes(files["rgb.jpg"].read_bytes()[:300])
    bad = [str(tmp_path / n) for n in ("bad.png", "empty.jpg", "cut.jpg")]
    paths = [str(p) for p in files.values()]
    assert main(["predict", str(run_dir), bad[0], *paths, *bad[1:], "--topk", "3",
                 "--json"]) == 1
    captured = capsys.readouterr()
    lines = [json.loads(ln) for ln in captured.out.splitlines()]
    assert [ln["path"] for ln in lines] == paths  # every good file, in order
    classes = {"T-shirt/top", "Trouser", "Pullover", "Dress", "Coat", "Sandal", "Shirt",
               "Sneaker", "Bag", "Ankle boot"}
    for ln in lines:
        probs = [p["prob"] for p in ln["predictions"]]
        assert len(probs) == 3 and probs == sorted(probs, reverse=True)
        assert {p["label"] for p in ln["predictions"]} <= classes
    errors = captured.err.strip().splitlines()
    assert errors[0] == f"error: {tmp_path / 'bad.png'}: not a recognised image format"
    assert [e.split(":")[1].strip() for e in errors] == bad  # one line per bad file


def test_eval_shows_a_progress_bar_when_asked(run_dir: Path, tmp_path: Path,
                                              capsys: pytest.CaptureFixture[str]) -> None:
    """Issue 16, item 7: `eval --tta multiscale` was silent for a minute."""
    from resnetlab.evaluation.run import evaluate_run

    for shown in (True, False):
        capsys.readouterr()
        evaluate_run(run_dir, tta="multiscale", backend="torch", precision="fp32",
                     batch_size=64, out=tmp_path / f"{shown}.json", progress=shown)
        err = capsys.readouterr().err
        assert ("test, tta=multiscale" in err and "4/4" in err) == shown, err


def test_eval_reports_of_other_backends_and_precisions_are_kept_apart(
        run_dir: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    """Every backend and precision wrote eval-test-center.json, the last one overwriting
    the others; and a first agreement check was shown twice (logged and printed)."""
    run = tmp_path / "run"
    shutil.copytree(run_dir, run)
    caplog.set_level("INFO")
    assert main(["eval", str(run), "--backend", "torch", "--precision", "fp32"]) == 0
    reference = run / "final" / "eval-test-center.json"  # the name PyTorch fp32 keeps
    before = reference.read_bytes()
    assert json.loads(before)["precision"] == "fp32"
    for first in (True, False):  # the check is measured, then read from its record
        capsys.readouterr()
        caplog.clear()
        assert main(["eval", str(run), "--backend", "torch", "--precision", "bf16",
                     "--min-agreement", "0"]) == 0
        out, err = capsys.readouterr()
        shown = "\n".join([out, err, *(r.getMessage() for r in caplog.records)])
        assert shown.count("torch bf16: top-1 agrees with fp32 on") == 1, (first, shown)
        assert ("checking torch bf16 against fp32" in shown) == first
    bf16 = run / "final" / "eval-test-center-torch-bf16.json"
    report = json.loads(bf16.read_text())
    assert (report["backend"], report["precision"]) == ("torch", "bf16")
    assert 0 < report["agreement_with_fp32"] <= 1
    assert f"results: {bf16}" in out and bf16.with_suffix(".png").exists()
    assert reference.read_bytes() == before  # the fp32 report is still fp32's


@pytest.mark.parametrize("topk", ["0", "-1", "2.5", "many"])
def test_predict_refuses_a_topk_below_one(run_dir: Path, tmp_path: Path, topk: str,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """--topk 0 and -1 were silently top-1 (serve answers 400 for them): argparse refuses
    them, in one line after its usage, before anything is loaded."""
    image = _image_files(tmp_path)["rgb.jpg"]
    with pytest.raises(SystemExit) as e:
        main(["predict", str(run_dir), str(image), "--topk", topk])
    assert e.value.code == 2
    captured = capsys.readouterr()
    assert captured.out == ""
    assert captured.err.strip().splitlines()[-1] == \
        f"resnetlab predict: error: argument --topk: '{topk}': give a whole number >= 1"


def test_train_refuses_fewer_than_one_process(capsys: pytest.CaptureFixture[str]) -> None:
    """--nproc 0 or -1 trained one process without a word."""
    for nproc in ("0", "-1"):
        with pytest.raises(SystemExit) as e:
            main(["train", "--preset", "smoke", "--nproc", nproc])
        assert e.value.code == 2
        assert capsys.readouterr().err.strip().splitlines()[-1] == \
            f"resnetlab train: error: argument --nproc: '{nproc}': give a whole number >= 1"


def test_predict_topk_one_is_one_class(run_dir: Path, tmp_path: Path,
                                       capsys: pytest.CaptureFixture[str]) -> None:
    image = _image_files(tmp_path)["rgb.jpg"]
    assert main(["predict", str(run_dir), str(image), "--topk", "1", "--json", "--backend",
                 "torch", "--precision", "fp32"]) == 0
    assert len(json.loads(capsys.readouterr().out)["predictions"]) == 1
