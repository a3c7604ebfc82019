"""Presets, the override path and its errors, and learning-rate schedules."""

import re
from pathlib import Path

import pytest
import yaml

from resnetlab.config import PRESETS, ScheduleConfig, parse_set, resolve, to_yaml
from resnetlab.errors import ConfigError
from resnetlab.models.factory import create_model
from resnetlab.recipes import CifarNet, cifar_recipe
from resnetlab.reproduce.common import get_scale
from resnetlab.train.schedule import LRSchedule


def test_paper_cifar_recipe() -> None:
    cfg = resolve("cifar10-resnet110")
    assert cfg.model.name == "resnet110" and cfg.batch_size == 128
    assert (cfg.optim.lr, cfg.optim.momentum, cfg.optim.weight_decay) == (0.1, 0.9, 1e-4)
    s = cfg.schedule
    assert (s.kind, s.iterations, s.milestones) == ("multistep", 64000, [32000, 48000])
    assert (s.warmup_lr, s.warmup_until_error) == (0.01, 0.8)
    assert cfg.data.val_split == 5000 and cfg.data.normalize == "pixel" and cfg.data.pad == 4
    assert resolve("cifar10-resnet56").schedule.warmup_until_error == 0
    assert resolve("cifar10-plain20").model.name == "plain20"


@pytest.mark.parametrize("depth", [20, 56, 110, 1202])
def test_one_cifar_recipe_for_presets_and_reproduce_and_twins(depth: int) -> None:
    """The preset and a reproduce sub-run of the same net differ only in what a reproduce
    scale sets (sizes, data set, precision); a plain twin only in its shortcuts. The
    110-layer warm-up (paper sec. 4.2) is one rule for both twins."""
    scale = get_scale("paper")
    for net in (CifarNet(depth), CifarNet(depth, plain=True)):
        if net.plain and depth == 1202:
            continue  # no plain-1202 preset
        preset = resolve(f"cifar10-{net.label}")
        sub_run = scale.train_config(net)
        assert preset.optim == sub_run.optim and preset.schedule == sub_run.schedule
        # The same network: a preset names a plain twin as the registry does (plain<depth>).
        a, b = (create_model(c.model.name, **c.model.options) for c in (preset, sub_run))
        assert a.state_dict().keys() == b.state_dict().keys()
        assert all(isinstance(m, type(n)) for m, n in zip(a.modules(), b.modules(), strict=True))
        assert (preset.data.normalize, preset.data.pad, preset.data.flip) == ("pixel", 4, True)
        assert (sub_run.data.normalize, sub_run.data.pad, sub_run.data.flip) == ("pixel", 4, True)
        warm = (preset.schedule.warmup_lr, preset.schedule.warmup_until_error)
        assert warm == ((0.01, 0.8) if depth >= 110 else (0.0, 0.0))
    twins = [resolve(f"cifar10-{n}{depth}") for n in ("resnet", "plain") if depth != 1202]
    if twins:
        assert twins[0].schedule == twins[1].schedule and twins[0].optim == twins[1].optim
        assert (twins[0].model.name, twins[1].model.name) == (f"resnet{depth}", f"plain{depth}")


def test_recipe_settings_are_mappings_checked_like_any_other() -> None:
    with pytest.raises(ConfigError, match=r"unknown key 'optim\.lrr'"):
        resolve(None, settings=[{"optim": {"lrr": 0.1}}])
    cfg = resolve(None, sets=["optim.lr=0.5"], settings=[cifar_recipe(CifarNet(32))])
    assert cfg.optim.lr == 0.5 and cfg.model.name == "resnet32"  # --set comes last


def test_every_preset_resolves() -> None:
    for name in PRESETS:
        assert resolve(name).preset == name
    assert {f"imagenet-resnet{d}" for d in (18, 34, 50, 101, 152)} <= set(PRESETS)
    ims = resolve("imagenet-resnet50")
    assert (ims.batch_size, ims.schedule.iterations, ims.data.dataset) == (256, 600000, "folder")


def test_set_overrides_with_types() -> None:
    cfg = resolve("smoke", sets=["optim.lr=0.05", "schedule.milestones=[5, 10]",
                                 "model.options={shortcut: B}", "data.data_dir=/x",
                                 "optim.nesterov=true", "optim.weight_decay=0"])
    assert cfg.optim.lr == 0.05 and cfg.schedule.milestones == [5, 10]
    assert cfg.model.options == {"shortcut": "B"} and cfg.data.data_dir == "/x"
    assert cfg.optim.nesterov is True and cfg.optim.weight_decay == 0.0


@pytest.mark.parametrize(("sets", "message"), [
    (["optim.lrr=1"], "unknown key 'optim.lrr' \\(did you mean lr\\?\\); valid keys: optim.lr"),
    (["optim.lr=fast"], "optim.lr must be float, got 'fast'"),
    (["batch_size=1.5"], "batch_size must be int"),
    (["optim.nesterov=3"], "optim.nesterov must be bool"),
    (["schedule.kind=linear"], "schedule.kind must be one of multistep, cosine"),
    (["optim.momentum=1.5"], "momentum must be in"),
    (["model.name=resnet21"], "unknown model 'resnet21'"),
    (["model.options={shortcut: D}"], "resnet8: shortcut must be one of"),
    (["model.options={bogus: 1}"], "unknown model.options \\['bogus'\\]"),
    (["noequals"], "key=value"),
])
def test_bad_settings_are_named(sets: list[str], message: str) -> None:
    with pytest.raises(ConfigError, match=message):
        resolve("smoke", sets=sets)


def test_unknown_preset_lists_choices() -> None:
    with pytest.raises(ConfigError, match=r"did you mean smoke.*choose one of fashion-mnist"):
        resolve("smok")


def test_yaml_round_trip(tmp_path: Path) -> None:
    cfg = resolve("cifar10-resnet110", sets=["seed=3"])
    path = tmp_path / "c.yaml"
    path.write_text(to_yaml(cfg))
    assert resolve(None, str(path)) == cfg
    path.write_text("optim: [1, 2]\n")
    with pytest.raises(ConfigError, match="optim must be a mapping"):
        resolve(None, str(path))
    with pytest.raises(ConfigError, match="does not exist"):
        resolve(None, str(tmp_path / "missing.yaml"))


def test_parse_set_nests() -> None:
    assert parse_set(["a.b.c=1", "a.d=x"]) == {"a": {"b": {"c": 1}, "d": "x"}}


def test_multistep_schedule_values() -> None:
    s = LRSchedule(ScheduleConfig(kind="multistep", iterations=64000,
                                  milestones=[32000, 48000]), 0.1)
    assert [s(i) for i in (0, 31999)] == [0.1, 0.1]
    assert s(32000) == pytest.approx(0.01) and s(47999) == pytest.approx(0.01)
    assert s(48000) == pytest.approx(0.001) and s(63999) == pytest.approx(0.001)


def test_110_layer_warmup_switches_back_to_0_1() -> None:
    s = LRSchedule(resolve("cifar10-resnet110").schedule, 0.1)
    assert s(0) == 0.01 and s(399) == 0.01
    s.observe_train_error(399, 0.85)
    assert s(400) == 0.01
    s.observe_train_error(400, 0.8)  # "until ... below 80%": exactly 80% keeps warming up
    assert s(400) == 0.01 and not s.warmup.done
    s.observe_train_error(400, 0.79)
    assert s(401) == 0.1 and s.warmup.ended_at == 400
    assert s(32000) == pytest.approx(0.01)
    restored = LRSchedule(resolve("cifar10-resnet110").schedule, 0.1)
    restored.load_state_dict(s.state_dict())
    assert restored(401) == 0.1 and restored.warmup == s.warmup  # where it ended, too


def test_cosine_and_onecycle() -> None:
    cos = LRSchedule(ScheduleConfig(kind="cosine", iterations=100, milestones=[]), 0.2)
    assert cos(0) == pytest.approx(0.2) and cos(50) == pytest.approx(0.1)
    assert cos(100) == pytest.approx(0.0)
    one = LRSchedule(ScheduleConfig(kind="onecycle", iterations=100, warmup_iters=20,
                                    milestones=[]), 0.2)
    assert one(0) == 0.0 and one(10) == pytest.approx(0.1) and one(20) == pytest.approx(0.2)
    assert one(60) == pytest.approx(0.1) and one(100) == pytest.approx(0.0)


def test_preset_then_config_file_then_set(tmp_path: Path,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    """The one override path (config.py): each later source wins key by key, and keys it
    does not name keep the earlier value."""
    from resnetlab.cli import main

    path = tmp_path / "c.yaml"
    path.write_text("batch_size: 16\neval_every: 7\noptim:\n  lr: 0.03\n")
    assert main(["train", "--preset", "smoke", "--config", str(path), "--set",
                 "eval_every=3", "--set", "optim.momentum=0.8", "--print-config"]) == 0
    got = yaml.safe_load(capsys.readouterr().out)
    assert got["schedule"]["iterations"] == 20 and got["log_every"] == 5  # the preset's
    assert got["batch_size"] == 16 and got["optim"]["lr"] == 0.03  # the file's, over it
    assert got["eval_every"] == 3 and got["optim"]["momentum"] == 0.8  # --set, over both
    assert got["optim"]["weight_decay"] == 1e-4 and got["preset"] == "smoke"  # defaults kept


def test_every_schedule_kind_by_hand() -> None:
    """Values worked out by hand, with a floor, a non-zero warm-up start and a gamma other
    than 0.1, so that each term of each formula shows."""
    def sched(**kw: object) -> LRSchedule:
        return LRSchedule(ScheduleConfig(**{"milestones": [], **kw}), 0.2)  # type: ignore[arg-type]

    # Cosine over all 120 iterations (t = 1/3 at 40: cos = 0.5), floor 0.02; the first 40
    # ramp linearly from 0.01 to the cosine's value there, 0.02 + 0.18 * 0.75 = 0.155.
    cos = sched(kind="cosine", iterations=120, final_lr=0.02, warmup_iters=40, warmup_lr=0.01)
    got = [cos(i) for i in (0, 20, 40, 60, 120, 150)]
    assert got == pytest.approx([0.01, 0.0825, 0.155, 0.11, 0.02, 0.02], abs=1e-12)
    # One-cycle: up from 0.05 to 0.2 over 20, then linearly down to 0.02 at 100.
    one = sched(kind="onecycle", iterations=100, final_lr=0.02, warmup_iters=20,
                warmup_lr=0.05)
    got = [one(i) for i in (0, 10, 20, 60, 100, 130)]
    assert got == pytest.approx([0.05, 0.125, 0.2, 0.11, 0.02, 0.02], abs=1e-12)
    # A decay of no length: straight to the floor after the peak.
    flat = sched(kind="onecycle", iterations=20, final_lr=0.02, warmup_iters=20)
    assert (flat(20), flat(21)) == (pytest.approx(0.2), pytest.approx(0.02))
    step = sched(kind="multistep", milestones=[10, 20], gamma=0.5)
    assert [step(i) for i in (9, 10, 19, 20, 1000)] == pytest.approx([0.2, 0.1, 0.1, 0.05, 0.05])
    const = sched(kind="constant", warmup_iters=10)
    assert [const(i) for i in (0, 5, 10, 10**6)] == pytest.approx([0.0, 0.1, 0.2, 0.2])
    assert sched(kind="constant").warmup.done  # no conditional warm-up asked for


def test_numbers_in_scientific_notation_are_numbers(tmp_path: Path) -> None:
    """Issue 16, item 4: YAML 1.1 reads `1e-3` and `1e3` as strings, and they were refused
    ("optim.lr must be float, got '1e-3'"); what Python's int()/float() read is accepted,
    on the command line and in a YAML file alike."""
    cfg = resolve("smoke", sets=["optim.lr=1e-3", "schedule.iterations=1e3",
                                 "optim.weight_decay=5E-4", "batch_size=1_024"])
    assert (cfg.optim.lr, cfg.schedule.iterations, cfg.optim.weight_decay, cfg.batch_size) \
        == (0.001, 1000, 0.0005, 1024)
    assert isinstance(cfg.schedule.iterations, int)
    path = tmp_path / "c.yaml"
    path.write_text("optim:\n  lr: 2e-2\nschedule:\n  iterations: 2e2\n")
    from_file = resolve("smoke", str(path))
    assert (from_file.optim.lr, from_file.schedule.iterations) == (0.02, 200)
    for bad, message in [("schedule.iterations=1.5e0", "schedule.iterations must be int, "
                          "got 1.5"), ("optim.lr=1e-3x", "optim.lr must be float, got '1e-3x'"),
                         ("schedule.iterations=1e400", "schedule.iterations must be int")]:
        with pytest.raises(ConfigError, match=re.escape(message)):
            resolve("smoke", sets=[bad])
