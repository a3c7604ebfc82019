"""Precision per machine: what `auto` picks on each kind of CPU, the emulated AVX2 path,
and the old `bf16` setting."""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch
import yaml

from resnetlab import ConfigError, precision
from resnetlab.config import resolve, saved_config
from resnetlab.deploy.runtimes import RUNTIMES
from resnetlab.precision import CPU, infer_candidates, this_cpu, train_precision
from resnetlab.train.loop import train

from .conftest import interrupt_at

CPU_KINDS = {  # flags as /proc/cpuinfo spells them
    "zen3": CPU("AMD EPYC 7B13", frozenset({"avx2"})),
    "skylake": CPU("Xeon Skylake", frozenset({"avx2", "avx512f"})),
    "zen4": CPU("AMD EPYC 9B14", frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni"})),
    "sapphire": CPU("Xeon 8481C", frozenset({"avx2", "avx512f", "avx512_bf16", "avx512_vnni",
                                            "amx_bf16", "amx_int8"})),
}


@pytest.mark.parametrize(("kind", "cap", "train_auto", "ov_auto", "label"), [
    ("zen3", "", "fp32", ["fp32"], "avx2"),
    ("skylake", "", "fp32", ["fp32"], "avx512"),
    ("zen4", "", "bf16", ["int8", "bf16", "fp32"], "avx512-bf16"),
    ("sapphire", "", "bf16", ["int8", "bf16", "fp32"], "amx"),
    # The emulated older CPU: oneDNN capped, as ONEDNN_MAX_CPU_ISA=AVX2 does.
    ("sapphire", "AVX2", "fp32", ["fp32"], "avx2"),
    ("sapphire", "AVX512_CORE_VNNI", "fp32", ["int8", "fp32"], "avx512"),
    ("sapphire", "AVX2_VNNI", "fp32", ["int8", "fp32"], "avx2"),
    ("zen4", "NOT_AN_ISA", "fp32", ["fp32"], "other"),
])
def test_auto_picks_only_what_the_cpu_runs_natively(kind: str, cap: str, train_auto: str,
                                                    ov_auto: list[str], label: str) -> None:
    cpu = CPU(CPU_KINDS[kind].model, CPU_KINDS[kind].flags, cap)
    choice = train_precision("auto", torch.device("cpu"), cpu)
    assert choice.precision == train_auto and cpu.model in choice.reason
    assert infer_candidates(RUNTIMES["openvino"].precisions, cpu) == ov_auto
    # ORT's CPU EP has no bf16
    assert "bf16" not in infer_candidates(RUNTIMES["onnxruntime"].precisions, cpu)
    assert cpu.kind == label
    # Asked for explicitly, a precision is honoured, and an emulated one says so.
    forced = train_precision("bf16", torch.device("cpu"), cpu)
    assert forced.precision == "bf16" and ("emulated" in forced.reason) == (train_auto == "fp32")


def test_unknown_precision_is_one_clear_error() -> None:
    with pytest.raises(ConfigError, match="precision must be one of auto, fp32"):
        resolve("smoke", sets=["precision=fp16"])


def test_this_cpu_reads_the_real_flags() -> None:
    cpu = this_cpu()
    text = Path("/proc/cpuinfo").read_text() if Path("/proc/cpuinfo").exists() else ""
    flags = set(next((ln.split(":", 1)[1].split() for ln in text.splitlines()
                      if ln.startswith("flags")), []))
    if not flags:
        pytest.skip("no /proc/cpuinfo flags on this system")
    expected = flags & set(precision.FLAGS)
    if not torch.ops.mkldnn._is_mkldnn_bf16_supported():  # torch's oneDNN has the last word
        expected -= {"amx_bf16", "avx512_bf16"}  # (it says no under ONEDNN_MAX_CPU_ISA=AVX2)
    assert cpu.flags == frozenset(expected)


def test_emulated_avx2_cpu_trains_and_infers_in_fp32(tmp_path: Path) -> None:
    """The real detection path under ONEDNN_MAX_CPU_ISA=AVX2, on whatever CPU runs this."""
    env = {**os.environ, "ONEDNN_MAX_CPU_ISA": "AVX2"}
    code = ("import json, torch; from resnetlab.precision import *; c = this_cpu(); "
            "print(json.dumps([c.native_bf16, c.native_int8, c.kind, "
            "train_precision('auto', torch.device('cpu')).precision, "
            "infer_candidates(('fp32', 'bf16', 'int8'))]))")
    out = subprocess.run([sys.executable, "-c", code], env=env, capture_output=True,
                         text=True, check=True).stdout
    assert json.loads(out) == [False, False, "avx2", "fp32", ["fp32"]]


def test_info_machine_names_cpu_rates_and_choice(capsys: pytest.CaptureFixture[str]) -> None:
    from resnetlab.cli import main

    assert main(["info", "--machine"]) == 0
    out = capsys.readouterr().out
    assert this_cpu().model in out and "sgemm" in out and "bf16 gemm" in out
    expected = "bf16" if this_cpu().native_bf16 else "fp32"
    assert f"precision=auto picks: training {expected}" in out


@pytest.mark.parametrize(("old", "new"), [(True, "bf16"), (False, "fp32"), (None, "auto")])
def test_the_old_bf16_setting_still_reads(tmp_path: Path, old: bool | None, new: str) -> None:
    saved = tmp_path / "config.yaml"
    data = yaml.safe_load(yaml.safe_dump({"bf16": old, "seed": 3}))
    saved.write_text(yaml.safe_dump(data))
    assert resolve(None, str(saved)).precision == new
    assert (saved_config(saved) or {})["precision"] == new
    assert resolve("smoke", sets=[f"bf16={json.dumps(old)}"]).precision == new


def test_auto_is_resolved_into_the_run_and_kept_on_resume(tmp_path: Path, fashion_dir: Path,
                                                          monkeypatch: pytest.MonkeyPatch,
                                                          ) -> None:
    """config.yaml keeps the request (auto), choices.json and eval.json what it became and
    why; a resume on a CPU that would choose otherwise continues in the run's precision."""
    sets = [f"data.data_dir={fashion_dir}", "data.verify=false", "schedule.iterations=4",
            "eval_every=2"]
    run = tmp_path / "run"
    interrupt_at(monkeypatch, 3)  # unfinished: a finished run is re-reported, not resumed
    with pytest.raises(KeyboardInterrupt):
        train(resolve("smoke", sets=[*sets, "precision=auto"]), run, progress=False)
    monkeypatch.undo()
    chose = "bf16" if this_cpu().native_bf16 else "fp32"
    assert yaml.safe_load((run / "config.yaml").read_text())["precision"] == "auto"
    recorded = json.loads((run / "choices.json").read_text())
    assert recorded["precision"] == chose and this_cpu().model in recorded["reason"]
    assert (run / "config.yaml").read_text().startswith(f"# precision: {chose} (auto: ")
    other = CPU("other", frozenset() if chose == "bf16" else CPU_KINDS["sapphire"].flags)
    monkeypatch.setattr(precision, "this_cpu", lambda: other)
    assert train_precision("auto", torch.device("cpu")).precision != chose  # it would differ
    res = train(resolve("smoke", sets=[*sets, "precision=auto"]), run, resume=True,
                progress=False)
    assert res.iterations == 4
    report = json.loads((run / "eval.json").read_text())
    assert report["precision"] == chose
    assert report["precision_reason"] == "auto: kept from the run being resumed"
    assert json.loads((run / "choices.json").read_text())["precision"] == chose


def test_a_run_saved_with_the_old_bf16_key_resumes(tmp_path: Path, fashion_dir: Path,
                                                   monkeypatch: pytest.MonkeyPatch) -> None:
    """Runs trained before `precision` existed hold `bf16: null` (fp32 on the CPU): the same
    command continues them in fp32, wherever bf16 is native."""
    sets = [f"data.data_dir={fashion_dir}", "data.verify=false", "schedule.iterations=4",
            "eval_every=2"]
    run = tmp_path / "old"
    interrupt_at(monkeypatch, 3)  # unfinished: a finished run is re-reported, not resumed
    with pytest.raises(KeyboardInterrupt):
        train(resolve("smoke", sets=[*sets, "precision=fp32"]), run, progress=False)
    monkeypatch.undo()
    saved = yaml.safe_load((run / "config.yaml").read_text())
    del saved["precision"]
    saved["bf16"] = None
    (run / "config.yaml").write_text(yaml.safe_dump(saved))
    (run / "choices.json").unlink()  # written since: an old run has none
    res = train(resolve("smoke", sets=sets), run, resume=True, progress=False)
    assert res.iterations == 4
    assert json.loads((run / "choices.json").read_text())["precision"] == "fp32"
    assert json.loads((run / "eval.json").read_text())["precision"] == "fp32"
