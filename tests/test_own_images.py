"""Issue 31: `resnetlab train DIR` on the user's own folder of images, with no other flag:
a recipe sized from the data, problems listed before anything is written, the request
and the choice both recorded, and every flag reaching the config by one path."""

import dataclasses
import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
import yaml
from PIL import Image

import resnetlab
from resnetlab import ConfigError
from resnetlab.cli import main
from resnetlab.config import changes, resolve
from resnetlab.data.folder import eval_transform
from resnetlab.data.images import load_image
from resnetlab.deploy.predict import Predictor
from resnetlab.recipes import EPOCHS, LR_PER_128, MAX_EVALS, total_stride
from resnetlab.train.loop import train
from resnetlab.train.request import train_config

from .conftest import interrupt_at

SIZES = [(37, 45), (40, 40), (44, 36), (41, 39)]  # odd, unequal: the recipe takes the median


def _image(rng: np.random.Generator, label: int, size: tuple[int, int]) -> Image.Image:
    """A class told by its colour (a learnable folder), with noise, at `size`."""
    base = np.zeros(3)
    base[label % 3] = 80 + 60 * (label // 3)
    pixels = np.clip(base + rng.normal(0, 25, (size[1], size[0], 3)), 0, 255)
    return Image.fromarray(pixels.astype(np.uint8), "RGB")


def make_folder(root: Path, classes: int, per_class: int, val: dict[str, int] | None,
                seed: int = 0) -> Path:
    """root/train/<class>/ (+ root/val/<class>/ for the classes `val` names, with that many
    images each), or, with val=None, the Keras layout root/<class>/."""
    rng = np.random.default_rng(seed)
    train = root / "train" if val is not None else root
    for c in range(classes):
        d = train / f"kind{c}"
        d.mkdir(parents=True)
        for i in range(per_class):
            _image(rng, c, SIZES[i % len(SIZES)]).save(d / f"{i}.png")
    for name, n in (val or {}).items():
        d = root / "val" / name
        d.mkdir(parents=True)
        for i in range(n):
            _image(rng, int(name[4:]), SIZES[i % len(SIZES)]).save(d / f"{i}.png")
    return root


@pytest.fixture(scope="module")
def photos(tmp_path_factory: pytest.TempPathFactory) -> Path:
    """3 classes, 24 training images each; val/ lacks kind2."""
    return make_folder(tmp_path_factory.mktemp("photos"), 3, 24, {"kind0": 8, "kind1": 8})


def test_a_folder_with_no_other_flag_trains_evaluates_and_predicts(
        photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    run = tmp_path / "run"
    caplog.set_level("INFO")
    assert main(["train", str(photos), "--out", str(run)]) == 0
    # An evaluation every 4 steps still leaves 10 steps to time the expected-time line on.
    assert sum(r.message.startswith("expected: about") for r in caplog.records) == 1
    out = capsys.readouterr().out
    assert "3 classes (kind0, kind1, kind2), 72 training images of about 38 px" in out
    assert "resnet20 at 38 px, from scratch" in out
    assert "validation: val/ (16 images); test: val/" in out
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    # Sized from the data: batch 16 (72 / 4, a power of two), the epochs the recipe names.
    assert cfg["preset"] == "folder" and cfg["batch_size"] == 16
    assert cfg["data"]["image_size"] == 38 and cfg["data"]["val_split"] == 0
    assert cfg["schedule"]["epochs"] == EPOCHS["scratch"]
    assert cfg["schedule"]["iterations"] == EPOCHS["scratch"] * (72 // 16)
    evals = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()
             if '"eval"' in line]
    # An evaluation an epoch, capped: 40 epochs are scored every other one.
    assert [e["epoch"] for e in evals] == [2.0 * k for k in range(1, MAX_EVALS + 1)]
    assert all(e["val_error"] == e["test_error"] for e in evals)  # val/ is the test split
    report = json.loads((run / "eval.json").read_text())
    assert report["count"] == 16
    assert list(report["per_class_accuracy"]) == ["kind0", "kind1", "kind2"]
    assert report["per_class_accuracy"]["kind2"] is None  # val/ has none: no accuracy, not 0%
    assert main(["predict", str(run), str(photos / "val" / "kind1" / "0.png"), "--json",
                 "--backend", "torch"]) == 0
    line = json.loads(capsys.readouterr().out)
    assert {p["label"] for p in line["predictions"]} == {"kind0", "kind1", "kind2"}
    # predict (and serve) see the view eval scored: at 38 px too, the 256/224 centre crop.
    image = photos / "val" / "kind1" / "0.png"
    seen = Predictor(run / "final", "torch", "fp32").preprocess(image)[0]
    mc = resnetlab.load_model(run / "final").model_config
    torch.testing.assert_close(seen, eval_transform(38, mc.mean, mc.std)(load_image(image)),
                               atol=1e-5, rtol=0)
    assert main(["eval", str(run), "--backend", "torch"]) == 0
    said = capsys.readouterr().out
    assert "top-1 error" in said
    assert any(ln.split()[:1] == ["kind2"] and "(no images)" in ln for ln in said.splitlines())
    for tta in ("10crop", "multiscale"):  # views cut from the whole image: all 16 scored
        assert main(["eval", str(run), "--backend", "torch", "--precision", "fp32", "--tta",
                     tta]) == 0
        assert json.loads((run / "final" / f"eval-test-{tta}.json").read_text())["count"] == 16


def test_a_folder_without_val_holds_out_a_tenth_of_every_class(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """The Keras layout (DIR/<class>/), with one corrupt file among 61: it is named once and
    left out, and training goes on (it used to stop the run past the 1% bar, or, with the
    bar raised, name the file again every epoch)."""
    root = make_folder(tmp_path / "keras", 4, 15, None)
    (root / "kind3" / "broken.png").write_bytes(b"not an image")
    # and one whose header reads but whose pixels are cut off: the loader meets it, once
    png = (root / "kind2" / "0.png").read_bytes()
    (root / "kind2" / "cut.png").write_bytes(png[:len(png) // 2])
    cfg, scan = train_config(sets=[f"data.data_dir={json.dumps(str(root))}"])
    assert scan is not None and scan.val is None and scan.n_train == 61
    assert cfg.data.val_split == 6 and cfg.data.stratified
    assert cfg.eval_every == cfg.schedule.warmup_iters * 2  # 40 epochs: every other one
    run = tmp_path / "run"
    caplog.set_level("INFO")
    assert main(["train", str(root), "--out", str(run), "--set", "schedule.epochs=3"]) == 0
    said = [r.message for r in caplog.records if "broken.png" in r.message]
    assert len(said) == 1 and "left out" in said[0]
    assert sum("cut.png" in r.message for r in caplog.records) == 1
    report = json.loads((run / "eval.json").read_text())
    assert report["count"] == 6  # the hold-out is the test split too
    assert all(v is not None for v in report["per_class_accuracy"].values())


def test_init_from_a_torchvision_file_makes_a_fine_tuning_recipe(
        photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str],
        caplog: pytest.LogCaptureFixture) -> None:
    tv = tmp_path / "tv.pth"
    torch.save(resnetlab.to_torchvision(resnetlab.create_model("resnet18").state_dict()), tv)
    run = tmp_path / "run"
    caplog.set_level("INFO")
    assert main(["train", str(photos), "--init", str(tv), "--out", str(run)]) == 0
    out = capsys.readouterr().out
    assert f"resnet18 at 38 px, from {tv} (fine-tuning)" in out
    cfg = resolve(None, str(run / "config.yaml"))
    assert cfg.model.name == "resnet18" and cfg.finetune.init == str(tv)
    per_128 = cfg.optim.lr * 128 / cfg.batch_size
    assert per_128 == pytest.approx(LR_PER_128["finetune"])
    assert LR_PER_128["finetune"] < LR_PER_128["scratch"]
    assert cfg.schedule.warmup_iters == 72 // cfg.batch_size  # one epoch
    assert cfg.schedule.epochs == EPOCHS["finetune"]
    assert cfg.optim.weight_decay == 1e-4  # a scratch run's is 5e-4: the recipe switched
    said = [r.message for r in caplog.records if "classifier re-initialised" in r.message]
    assert said == [f"classifier re-initialised: {tv} has 1000 classes, this data 3"]


def test_small_images_meet_an_imagenet_net_at_its_stride(tmp_path: Path) -> None:
    """28 px images with resnet18 weights: the recipe takes the net's 32, not 28."""
    root = tmp_path / "tiny"
    for c in range(2):
        (root / f"c{c}").mkdir(parents=True)
        for i in range(6):
            Image.new("RGB", (28, 28), (40 * c, 0, 0)).save(root / f"c{c}" / f"{i}.png")
    cfg, _ = train_config(sets=[f"data.data_dir={json.dumps(str(root))}",
                                "model.name=resnet18"])
    assert total_stride("resnet18") == 32 and cfg.data.image_size == 32


def test_every_problem_is_listed_before_anything_is_written(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    root = make_folder(tmp_path / "broken", 3, 4, {"kind0": 2, "kind9": 2})
    for f in (root / "train" / "kind1").iterdir():
        f.unlink()
    for i in range(3):
        (root / "train" / "kind2" / f"bad{i}.png").write_bytes(b"not an image")
    run = tmp_path / "run"
    assert main(["train", str(root), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    assert "kind1" in err and "kind9" in err and "bad0.png" in err, err
    assert not run.exists()  # neither config.yaml nor .lock nor the directory stays


def test_a_folder_that_is_no_data_set_says_how_to_lay_it_out(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    empty, run = tmp_path / "nothing", tmp_path / "run"
    empty.mkdir()
    run.mkdir()
    (run / "notes.txt").write_text("mine")
    assert main(["train", "--data-dir", str(empty), "--out", str(run)]) == 2
    err = capsys.readouterr().err
    # What is wrong with it, not the default data set's missing files.
    assert f"{empty} has no class folders" in err and "DIR/train/<class>/" in err
    assert "Fashion-MNIST" not in err
    assert sorted(p.name for p in run.iterdir()) == ["notes.txt"]  # the user's file stays
    assert main(["train", str(tmp_path / "photso"), "--out", str(run)]) == 2
    assert "photso does not exist" in capsys.readouterr().err


def test_config_yaml_keeps_the_request_and_choices_json_the_choice(
        photos: Path, tmp_path: Path) -> None:
    run = tmp_path / "run"
    assert main(["train", str(photos), "--out", str(run), "--set", "schedule.epochs=1"]) == 0
    assert yaml.safe_load((run / "config.yaml").read_text())["precision"] == "auto"
    chosen = json.loads((run / "choices.json").read_text())
    assert chosen["precision"] in ("fp32", "bf16") and chosen["reason"].startswith("auto")
    # Fed back, the request is asked again (on another CPU auto may choose otherwise).
    assert resolve(None, str(run / "config.yaml")).precision == "auto"
    report = json.loads((run / "eval.json").read_text())
    assert report["precision"] == chosen["precision"]


def test_flags_are_set_pairs_and_set_wins(photos: Path, tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str],
                                          monkeypatch: pytest.MonkeyPatch) -> None:
    assert main(["train", "--data-dir", str(photos), "--set", "batch_size=8",
                 "--set", "model.name=resnet8", "--print-config"]) == 0
    cfg = yaml.safe_load(capsys.readouterr().out)
    assert cfg["data"]["data_dir"] == str(photos) and cfg["batch_size"] == 8
    assert cfg["model"]["name"] == "resnet8"
    assert cfg["schedule"]["warmup_iters"] == (72 - 0) // 8  # sized from the asked batch
    monkeypatch.chdir(photos.parent)  # a relative folder is saved absolute: eval finds it
    assert main(["train", photos.name, "--print-config"]) == 0
    assert yaml.safe_load(capsys.readouterr().out)["data"]["data_dir"] == str(photos)
    assert main(["train", str(photos), "--data-dir", str(tmp_path), "--print-config"]) == 2
    assert "two data directories" in capsys.readouterr().err


def test_eval_takes_set_for_the_data(photos: Path, tmp_path: Path,
                                     capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    assert main(["train", str(photos), "--out", str(run), "--set", "schedule.epochs=1"]) == 0
    capsys.readouterr()
    assert main(["eval", str(run), "--set", "data.max_bad_fraction=1.5"]) == 2
    assert "max_bad_fraction" in capsys.readouterr().err
    assert main(["eval", str(run), "--backend", "torch", "--set",
                 "data.max_bad_fraction=0.5"]) == 0
    # A folder whose classes are not the model's is refused: its labels would be off.
    more = tmp_path / "more"
    shutil.copytree(photos, more)
    (more / "train" / "bird").mkdir()
    _image(np.random.default_rng(0), 0, (40, 40)).save(more / "train" / "bird" / "0.png")
    capsys.readouterr()
    assert main(["eval", str(run), "--backend", "torch", "--data-dir", str(more)]) == 2
    assert "other classes than the model was trained on (new: bird)" in capsys.readouterr().err
    # A file whose pixels are cut off (its header reads) is left out, and the report says so.
    cut = tmp_path / "cut"
    shutil.copytree(photos, cut)
    png = (cut / "val" / "kind0" / "0.png").read_bytes()
    (cut / "val" / "kind0" / "0.png").write_bytes(png[:len(png) // 2])
    out = tmp_path / "cut.json"
    assert main(["eval", str(run), "--backend", "torch", "--precision", "fp32", "--data-dir",
                 str(cut), "--out", str(out), "--set", "data.max_bad_fraction=0.5"]) == 0
    assert "1 unreadable image file left out of the 15 scored" in capsys.readouterr().out
    assert json.loads(out.read_text())["unreadable_skipped"] == 1


def test_a_resume_may_change_how_bad_files_are_met_not_what_is_computed(
        photos: Path) -> None:
    """A run stopped by unreadable files resumes with data.max_bad_fraction raised (its
    error says to raise it), or with other loader workers; anything else is a change."""
    base = [f"data.data_dir={json.dumps(str(photos))}"]
    saved = yaml.safe_load(yaml.safe_dump(dataclasses.asdict(train_config(sets=base)[0])))
    assert changes(saved, train_config(sets=[*base, "data.max_bad_fraction=0.2",
                                             "data.workers=0"])[0]) == []
    assert changes(saved, train_config(sets=[*base, "data.image_size=40"])[0]) == \
        ["data.image_size 38 -> 40"]


@pytest.mark.slow
def test_nproc_2_sends_the_folder_the_init_and_the_sets_to_both_ranks(
        photos: Path, tmp_path: Path) -> None:
    """The ranks read the config resolved once, in the launcher: the folder recipe, --init
    and --set reach both (rank 1 would otherwise train a default resnet20 from scratch)."""
    w = tmp_path / "w"
    resnetlab.save_weights(resnetlab.create_model("resnet8", num_classes=3), w)
    run = tmp_path / "run"
    proc = subprocess.run([sys.executable, "-m", "resnetlab", "train", str(photos), "--nproc",
                           "2", "--init", str(w), "--set", "schedule.epochs=1",
                           "--set", "finetune.freeze=backbone", "--set", "data.workers=0",
                           "--out", str(run)], capture_output=True, text=True, timeout=300,
                          env=dict(os.environ, OMP_NUM_THREADS="1"))
    assert proc.returncode == 0, proc.stderr[-3000:]
    cfg = yaml.safe_load((run / "config.yaml").read_text())
    assert cfg["model"]["name"] == "resnet8" and cfg["finetune"]["freeze"] == "backbone"
    start = resnetlab.load_model(w).state_dict()
    final = resnetlab.load_model(run / "final").state_dict()
    assert all(torch.equal(final[k], v) for k, v in start.items() if not k.startswith("head."))


def test_classes_of_one_image_get_one_clear_problem(tmp_path: Path,
                                                    capsys: pytest.CaptureFixture[str]) -> None:
    """No class can spare an image for validation, and there is no val/: one message that
    says what to do, not advice that leads to another error."""
    root = make_folder(tmp_path / "one", 3, 1, None)
    cfg, _ = train_config(sets=[f"data.data_dir={json.dumps(str(root))}"])
    assert cfg.data.val_split == 0
    assert main(["train", str(root), "--out", str(tmp_path / "run")]) == 2
    err = capsys.readouterr().err
    assert "nothing is left to test on" in err and "a class of one image" in err


def test_a_resume_keeps_the_runs_length_and_refuses_changed_images(
        photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """schedule.epochs became iterations when the run started; more images since would
    stretch its schedule mid-run, so the resume says so instead."""
    data = tmp_path / "photos"
    shutil.copytree(photos, data)
    cfg, _ = train_config(sets=[f"data.data_dir={json.dumps(str(data))}",
                                "schedule.epochs=3", "data.workers=0"])
    run = tmp_path / "run"
    interrupt_at(monkeypatch, 5)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, run, progress=False)
    monkeypatch.undo()
    assert yaml.safe_load((run / "config.yaml").read_text())["schedule"]["iterations"] == 12
    for i in range(16):
        _image(np.random.default_rng(i), 0, (40, 40)).save(data / "train" / "kind0" / f"n{i}.png")
    own = resolve(None, str(run / "config.yaml"))
    with pytest.raises(ConfigError, match="4 batches an epoch and the data now gives 5"):
        train(own, run, resume=True, progress=False)
    assert (run / "config.yaml").exists() and (run / "checkpoints").exists()  # kept


def test_a_changed_folder_is_refused_by_resume_and_by_eval_of_its_held_out_images(
        tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
        capsys: pytest.CaptureFixture[str]) -> None:
    """One image more, too few to change the batches an epoch: each class's shuffle, hence
    the held-out images, would change, and trained images could be scored as test images.
    Restored, the folder resumes; the refusals keep every file of the run."""
    root = make_folder(tmp_path / "keras", 3, 12, None)
    run = tmp_path / "run"
    cfg, _ = train_config(sets=[f"data.data_dir={json.dumps(str(root))}",
                                "schedule.epochs=2", "data.workers=0"])
    interrupt_at(monkeypatch, 3)
    with pytest.raises(KeyboardInterrupt):
        train(cfg, run, progress=False)
    monkeypatch.undo()
    assert json.loads((run / "data.json").read_text())["train_files"] == 36
    extra = root / "kind0" / "extra.png"
    _image(np.random.default_rng(9), 0, (40, 40)).save(extra)
    own = resolve(None, str(run / "config.yaml"))
    with pytest.raises(ConfigError, match=r"changed since .* \(36 image files then, 37 now\)"):
        train(own, run, resume=True, progress=False)
    extra.unlink()
    train(own, run, resume=True, progress=False)
    extra.write_bytes((root / "kind0" / "0.png").read_bytes())
    (root / "kind0" / "0.png").unlink()  # as many files, not the same ones
    capsys.readouterr()
    assert main(["eval", str(run), "--backend", "torch"]) == 2
    err = capsys.readouterr().err
    assert "36 image files then and now, but not the same ones" in err
    assert "held-out test images would be drawn anew" in err


def test_a_precision_check_without_the_runs_images_leaves_it_unchecked(
        tmp_path: Path, caplog: pytest.LogCaptureFixture) -> None:
    """predict/serve check a reduced precision on the run's test images; where those cannot
    be read (the folder moved or changed), the precision is unchecked, as for weights
    outside a run (auto then keeps fp32), instead of predict failing."""
    from resnetlab.data import DataError
    from resnetlab.deploy import backends

    def gone() -> list[torch.Tensor]:
        raise DataError("photos does not exist")

    assert backends._check(tmp_path, "torch", "bf16", gone, 0.99) is None
    assert "cannot be checked on the run's test images: photos does not exist" in caplog.text


def test_only_a_held_out_split_is_refused_after_the_training_images_changed(
        tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    """train/ and test/, no val/: validation is held out of train/, the test images are
    test/'s own. After train/ changes, scoring test/ goes on; the held-out val is refused."""
    root = make_folder(tmp_path / "photos", 3, 12, None)
    (tmp_path / "photos" / "train").mkdir()
    for c in range(3):
        (root / f"kind{c}").rename(root / "train" / f"kind{c}")
    test = make_folder(tmp_path / "t", 3, 4, None)
    test.rename(root / "test")
    run = tmp_path / "run"
    assert main(["train", str(root), "--out", str(run), "--set", "schedule.epochs=1"]) == 0
    _image(np.random.default_rng(9), 0, (40, 40)).save(root / "train" / "kind0" / "new.png")
    capsys.readouterr()
    assert main(["eval", str(run), "--backend", "torch", "--precision", "fp32"]) == 0
    assert main(["eval", str(run), "--split", "val", "--backend", "torch"]) == 2
    assert "its held-out val images would be drawn anew" in capsys.readouterr().err


def test_a_data_json_of_the_users_in_out_is_not_replaced(
        photos: Path, tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    run = tmp_path / "run"
    run.mkdir()
    (run / "data.json").write_text('{"mine": true}\n')
    assert main(["train", str(photos), "--out", str(run)]) == 2
    assert "data.json is not a run's" in capsys.readouterr().err
    assert (run / "data.json").read_text() == '{"mine": true}\n'


def test_the_precision_check_of_ten_crop_eval_sees_single_views(
        photos: Path, tmp_path: Path, monkeypatch: pytest.MonkeyPatch) -> None:
    """A folder's 10crop scores (N, 10, C, H, W) stacks; a reduced precision's check is run
    on plain (N, C, H, W) test images (a 5-D batch made the check's forward fail)."""
    from resnetlab.evaluation import run as eval_run

    run = tmp_path / "run"
    assert main(["train", str(photos), "--out", str(run), "--set", "schedule.epochs=1"]) == 0
    shapes: list[int] = []
    real = eval_run.load_backend

    def spy(*args: object, check: object = None, **kw: object) -> object:
        assert callable(check)
        shapes.extend(x.dim() for x in check())
        return real(*args, check=check, **kw)

    monkeypatch.setattr(eval_run, "load_backend", spy)
    eval_run.evaluate_run(run, tta="10crop", backend="torch", precision="fp32")
    assert shapes and set(shapes) == {4}

