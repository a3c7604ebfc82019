"""The benchmarks' machinery (not their speed: speed is never asserted in tests)."""

import importlib.util
import json
from pathlib import Path

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from resnetlab.benchmarks import BENCHMARKS, gpu_check, run_benchmark
from resnetlab.benchmarks import winograd as wino
from resnetlab.benchmarks.common import Timing, alternate, ratio
from resnetlab.benchmarks.profile import CATEGORIES, category
from resnetlab.cli import main

from .conftest import Variant


def test_alternate_rotates_and_counts_items() -> None:
    calls: list[str] = []

    def contender(name: str, items: int):
        def fn() -> int:
            calls.append(name)
            return items
        return fn

    t = alternate({"a": contender("a", 4), "b": contender("b", 8)}, rounds=3, calls=2, warmup=1)
    assert calls[:2] == ["a", "b"]  # warm-up
    assert calls[2:] == ["a", "a", "b", "b", "b", "b", "a", "a", "a", "a", "b", "b"]
    assert all(len(x.per_round) == 3 and min(x.per_round) > 0 for x in t.values())


def test_ratio_is_paired_by_round() -> None:
    # A slow second round slows both: the paired ratio stays 2, the ratio of medians would not.
    a, b = Timing("a", [20.0, 2.0, 18.0]), Timing("b", [10.0, 1.0, 10.0])
    assert ratio(a, b) == 2.0


@pytest.mark.parametrize(("gflops", "sizes"), [(1.0, [256, 512, 512, 512]),
                                               (200.0, [256, 512, 1024, 2048, 2048])])
def test_gemm_rate_sizes_its_products_to_the_cpu(monkeypatch: pytest.MonkeyPatch,
                                                 gflops: float, sizes: list[int]) -> None:
    # An emulated precision (bf16 on an AVX2 CPU: about 1 GFLOP/s) stops growing at 512,
    # where one product takes a quarter second; a native one reaches 2048 as before.
    from resnetlab.benchmarks import common

    timed: list[int] = []

    def product_seconds(n: int, dtype: torch.dtype) -> float:
        timed.append(n)
        return 2 * n ** 3 / (gflops * 1e9)

    monkeypatch.setattr(common, "_product_seconds", product_seconds)
    assert common.gemm_gflops(torch.bfloat16, reps=2) == pytest.approx(gflops)
    assert timed == sizes


def test_bench_train_runs_and_reports(tmp_path: Path) -> None:
    out = tmp_path / "train.json"
    assert run_benchmark("train", ["--cases", "resnet20-28x28x1", "--rounds", "1", "--calls",
                                   "1", "--workers", "0", "--no-compile", "--batch", "16",
                                   "--no-bf16", "--json", str(out)]) == 0
    measured = out.read_bytes()
    with pytest.raises(SystemExit) as refused:  # at once: an earlier result is never replaced
        run_benchmark("train", ["--cases", "resnet20-28x28x1", "--json", str(out)])
    assert refused.value.code == 2 and out.read_bytes() == measured
    res = json.loads(out.read_text())
    case = res["cases"]["resnet20-28x28x1"]
    assert set(case) == {"reference", "resnetlab"}
    assert case["reference"]["ratio_vs_reference"] == 1.0
    assert case["resnetlab"]["images_per_s"] > 0 and case["resnetlab"]["peak_fraction"] > 0
    assert {r["precision"] for r in case.values()} == {"fp32"}
    assert res["sgemm_gflops"] > 0 and "bf16_gemm_gflops" not in res
    assert not any("ratio_vs_users_best" in r for r in case.values())


def test_bench_train_bf16_adds_users_best(tmp_path: Path, monkeypatch: pytest.MonkeyPatch,
                                          capsys: pytest.CaptureFixture[str]) -> None:
    # bf16 runs on every CPU (emulated, and slow, without AVX512-BF16 or AMX): batch 4, and
    # stand-in gemm rates (measuring them takes seconds), distinct so that each contender
    # is seen to be put against its own precision's.
    from resnetlab.benchmarks import train

    def bf16_rate(dtype: torch.dtype) -> float:
        assert dtype == torch.bfloat16
        return 400.0

    monkeypatch.setattr(train, "sgemm_gflops", lambda: 100.0)
    monkeypatch.setattr(train, "gemm_gflops", bf16_rate)
    out = tmp_path / "train.json"
    assert run_benchmark("train", ["--cases", "resnet20-28x28x1", "--rounds", "1", "--calls",
                                   "1", "--workers", "0", "--no-compile", "--batch", "4",
                                   "--bf16", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    case = res["cases"]["resnet20-28x28x1"]
    assert set(case) == {"reference", "resnetlab", "resnetlab bf16", "user's best bf16"}
    assert (res["sgemm_gflops"], res["bf16_gemm_gflops"]) == (100.0, 400.0)
    for name, r in case.items():  # each against the gemm rate of its own precision
        want = "bf16" if name.endswith("bf16") else "fp32"
        assert r["precision"] == want
        assert r["peak_gflops"] == res["sgemm_gflops" if want == "fp32" else "bf16_gemm_gflops"]
        assert r["peak_fraction"] == pytest.approx(r["gflops"] / r["peak_gflops"])
    assert case["user's best bf16"]["ratio_vs_users_best"] == 1.0
    assert case["resnetlab bf16"]["ratio_vs_users_best"] > 0
    printed = capsys.readouterr().out
    assert "| resnet20-28x28x1 | user's best bf16 | bf16 |" in printed
    assert "resnetlab bf16 / user's best bf16:" in printed


@pytest.mark.parametrize(("chain", "in_cast", "want"), [
    (["bench: step", "aten::conv2d", "aten::convolution", "aten::mkldnn_convolution"], False,
     "convolution"),
    (["bench: step", "autograd::engine::evaluate_function: ConvolutionBackward0",
      "ConvolutionBackward0", "aten::convolution_backward", "aten::empty"], False,
     "convolution"),
    # autocast's cast runs inside the aten::conv2d it feeds; the same chain without a change
    # of dtype (a memory format only) stays with the convolution.
    (["bench: step", "aten::conv2d", "aten::to", "aten::_to_copy", "aten::copy_"], True,
     "dtype cast"),
    (["bench: step", "aten::conv2d", "aten::to", "aten::_to_copy", "aten::copy_"], False,
     "convolution"),
    (["bench: step", "resnetlab::bn_act_forward",
      "GeneratedBackwardFor_resnetlab_bn_act_forward_default", "aten::empty_like"], False,
     "batch norm"),
    (["bench: step", "autograd::engine::evaluate_function: NativeBatchNormBackward0",
      "NativeBatchNormBackward0", "aten::native_batch_norm_backward"], False, "batch norm"),
    (["bench: step", "aten::batch_norm", "aten::native_batch_norm", "aten::zeros",
      "aten::zero_", "aten::fill_"], False, "batch norm"),
    (["bench: step", "aten::relu", "aten::clamp_min"], False, "activation"),
    (["bench: step", "autograd::engine::evaluate_function: ReluBackward0", "ReluBackward0",
      "aten::threshold_backward"], False, "activation"),
    (["bench: step", "aten::add"], False, "add/elementwise"),
    # the engine summing the gradients of a residual block's input, after a convolution's
    (["bench: step", "autograd::engine::evaluate_function: ConvolutionBackward0", "aten::add_"],
     False, "add/elementwise"),
    (["bench: step", "Optimizer.step#SGD.step", "aten::_foreach_add_"], False, "optimizer"),
    (["bench: step", "Optimizer.step#SGD.step", "aten::add_"], False, "optimizer"),
    (["bench: step", "aten::cross_entropy_loss", "aten::log_softmax"], False, "loss"),
    (["bench: step", "autograd::engine::evaluate_function: NllLossBackward0",
      "NllLossBackward0", "aten::nll_loss_backward"], False, "loss"),
    # everything in the batch fetch is data, casts (uint8 to float) included
    (["bench: step", "bench: next batch", "aten::index"], False, "data"),
    (["bench: step", "bench: next batch", "aten::to", "aten::_to_copy", "aten::copy_"], True,
     "data"),
    # an uncategorised operator keeps its helpers: this fill_ is not an addition
    (["bench: step", "autograd::engine::evaluate_function: AvgPool2DBackward0",
      "AvgPool2DBackward0", "aten::avg_pool2d_backward", "aten::zero_", "aten::fill_"], False,
     "other"),
    (["bench: step"], False, "other"),
    (["bench: step", "aten::linear", "aten::addmm"], False, "other"),
])
def test_profile_categories(chain: list[str], in_cast: bool, want: str) -> None:
    assert category(chain, in_cast) == want


def test_bench_train_profile_table(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    out = tmp_path / "profile.json"
    assert run_benchmark("train", ["--cases", "resnet20-28x28x1", "--workers", "0", "--batch",
                                   "8", "--profile", "resnetlab", "--profile-steps", "2",
                                   "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["profile"]["contender"] == "resnetlab" and res["profile"]["steps"] == 2
    table = res["profile"]["cases"]["resnet20-28x28x1"]
    cats = table["categories"]
    assert tuple(cats) == CATEGORIES
    assert cats["convolution"]["ms_per_step"] > 0 and cats["data"]["ms_per_step"] > 0
    assert cats["batch norm"]["ms_per_step"] > 0 and cats["optimizer"]["ms_per_step"] > 0
    assert sum(r["percent"] for r in cats.values()) == pytest.approx(100, abs=0.01)
    assert sum(r["ms_per_step"] for r in cats.values()) == pytest.approx(
        table["ops_ms_per_step"])
    # the ops' self time is the step's wall, less what the profiler spends outside ops
    assert 0 < table["ops_ms_per_step"] <= table["wall_ms_per_step"] * 1.01
    printed = capsys.readouterr().out
    assert all(f"| {c} |" in printed for c in CATEGORIES)


@pytest.mark.runtimes
@pytest.mark.stochastic(precisions=["fp32"])  # inference precisions are its own contenders
def test_infer_contenders_agree_with_torchvision(tmp_path: Path, variant: Variant) -> None:
    """Every contender of `bench infer` scores what torchvision's eager resnet18 scores: fp32
    to the export's bar, bf16 near fp32 (bounds and their spread: docs/testing.md)."""
    pytest.importorskip("openvino")  # two of the contenders are OpenVINO
    import torch

    import resnetlab
    from resnetlab.benchmarks.infer import contenders, parity
    from resnetlab.precision import this_cpu

    resnetlab.save_weights(resnetlab.create_model("resnet18"), tmp_path / "w")
    # OpenVINO cannot compile bf16 under an ONEDNN_MAX_CPU_ISA cap (see test_deploy.py).
    ov_bf16 = not (this_cpu().onednn_cap and not this_cpu().native_bf16)
    fns = contenders("resnet18", tmp_path / "w", ["fp32", "bf16"] if ov_bf16 else ["fp32"])
    want = {"torchvision eager fp32", "resnetlab torch fp32", "resnetlab onnxruntime fp32",
            "resnetlab openvino fp32", "stand-alone onnxruntime fp32",
            "stand-alone openvino fp32"}
    if ov_bf16:
        want |= {"resnetlab torch bf16", "resnetlab openvino bf16", "stand-alone openvino bf16"}
    assert set(fns) == want
    x = torch.randn(2, 3, 224, 224)
    checks = parity(fns, x)
    scale = float(np.abs(fns["torchvision eager fp32"](x).numpy()).max())
    bound = 0.05 * scale + 1e-3
    fp32 = [c["max_abs_diff"] for n, c in checks.items() if n.endswith("fp32")]
    bf16 = [checks[n]["max_abs_diff"] / bound for n in want if not n.endswith("fp32")]
    variant.record(fp32_max_abs_diff=max(fp32), **({"bf16_diff_over_bound": max(bf16)}
                                                   if bf16 else {}))
    for name, c in checks.items():  # fp32 is held to the export's own bar
        if name.endswith("fp32"):
            assert c["max_abs_diff"] < 1e-3 and c["top1_identical"], name
    # bf16 (computed natively, emulated, or left in fp32 by the runtime) stays near fp32.
    for name in want - {n for n in want if n.endswith("fp32")}:
        assert checks[name]["max_abs_diff"] < bound, name


def test_bench_cli_lists_and_dispatches(capsys: pytest.CaptureFixture[str]) -> None:
    with pytest.raises(SystemExit) as e:
        main(["bench", "infer", "--help"])
    assert e.value.code == 0 and "--batches" in capsys.readouterr().out
    assert set(BENCHMARKS) == {"train", "infer", "data", "time-to-accuracy", "winograd",
                               "gpu-check", "serve"}


def test_winograd_ceiling_convolution_is_exact() -> None:
    """`resnetlab bench winograd` times F(4x4, 3x3)'s products; its convolution must be right,
    sizes that are not multiples of the tile included."""
    gen = torch.Generator().manual_seed(0)
    for c_in, c_out, size in [(3, 5, 7), (8, 4, 13), (16, 16, 16)]:
        w = torch.randn(c_out, c_in, 3, 3, generator=gen)
        x = torch.randn(1, c_in, size, size, generator=gen)
        got = wino.winograd_conv(x, wino.winograd_weight(w))
        want = F.conv2d(x, w, padding=1)
        assert got.shape == want.shape
        torch.testing.assert_close(got, want, rtol=1e-4, atol=1e-4)


@pytest.mark.runtimes  # its export step loads ONNX Runtime
def test_gpu_check_script_runs_its_cpu_path(tmp_path: Path, fashion_dir: Path) -> None:
    """`resnetlab bench gpu-check` runs rarely, on a lent GPU; its CPU path at toy sizes runs
    here so that it works when a GPU is at hand (only the CUDA device itself is left out)."""
    out = tmp_path / "gpu.json"
    assert gpu_check.main(["--device", "cpu", "--quick", "--data-dir", str(fashion_dir),
                           "--no-verify", "--json", str(out)]) == 0
    res = json.loads(out.read_text())
    assert res["demo"]["exit"] == 0 and 0 <= res["demo"]["test_accuracy"] <= 1
    assert res["demo"]["precision"] in ("fp32", "bf16")
    assert res["resnet50_step"]["ratio"] > 0 and res["torchrun"]["backend"] == "gloo"
    assert res["torchrun"]["exit"] == 0 and res["export_parity_exit"] == 0


def test_mutation_table_scores_without_the_excused_equivalents() -> None:
    spec = importlib.util.spec_from_file_location(
        "mutation_table", Path(__file__).parents[1] / "tools" / "mutation_table.py")
    assert spec is not None and spec.loader is not None
    mt = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mt)
    lines = ["    pkg.mod.x_f__mutmut_1: killed", "    pkg.mod.x_f__mutmut_2: survived",
             "    pkg.mod.x_f__mutmut_3: survived", "    pkg.mod.x_f__mutmut_4: timeout",
             "    pkg.mod.x_f__mutmut_5: no tests", "    pkg.mod.x_f__mutmut_6: not checked",
             "    pkg.other.x_g__mutmut_1: killed"]
    equivalents = mt.read_equivalents("# why each is equivalent\n"
                                      "pkg.mod.x_f__mutmut_3  same on every input\n"
                                      "pkg.mod.x_f__mutmut_1  listed, but a test tells it\n")
    assert equivalents["pkg.mod.x_f__mutmut_3"] == "same on every input"
    out = mt.table(lines, equivalents)
    # killed 1 and 4; 3 excused; 2 and 5 (no test calls it) count against; 6 not run.
    assert "| pkg.mod | 2 | 1 | 2 | 1 | 50.0% |" in out
    assert "| pkg.other | 1 | 0 | 0 | 0 | 100.0% |" in out
    assert "- pkg.mod.x_f__mutmut_2: survived\n- pkg.mod.x_f__mutmut_5: no tests" in out
    assert out.endswith("(killed, or no longer written):\n- pkg.mod.x_f__mutmut_1")


def test_bench_infer_reports_the_per_round_ratio_spread(monkeypatch: pytest.MonkeyPatch) -> None:
    """Each resnetlab backend's ratio to its stand-alone counterpart comes with its min and
    max over rounds, and every round starts on a quiet machine (nothing is timed here)."""
    from resnetlab.benchmarks import common, infer

    def logits(x: torch.Tensor) -> torch.Tensor:
        return x[:, :, :4, :4].reshape(len(x), -1)[:, :10] * 2

    names = [infer.REFERENCE, "resnetlab openvino bf16", "stand-alone openvino bf16",
             "resnetlab torch bf16"]
    monkeypatch.setattr(infer, "contenders", lambda *a, **k: dict.fromkeys(names, logits))
    monkeypatch.setattr(infer, "create_model", lambda *a, **k: None)
    monkeypatch.setattr(infer, "save_weights", lambda *a, **k: None)
    monkeypatch.setattr(infer, "sgemm_gflops", lambda: 100.0)
    monkeypatch.setattr(infer, "gemm_gflops", lambda *a, **k: 100.0)
    quiet: list[float] = []

    def spy(*args: object, quiet_s: float = 0.0, **kwargs: object) -> dict[str, Timing]:
        quiet.append(quiet_s)
        return common.alternate(*args, **kwargs)  # type: ignore[arg-type]

    monkeypatch.setattr(infer, "alternate", spy)
    res = infer.run(["resnet18"], [1, 2], rounds=5, seconds=0.0, say=lambda s: None,
                    precisions=["bf16"])
    assert quiet == [infer.QUIET_S, infer.QUIET_S] and infer.QUIET_S > 0
    for case in res["cases"].values():
        ours = case["resnetlab openvino bf16"]
        assert len(ours["per_round"]) == 5
        assert ours["ratio_vs_standalone_min"] <= ours["ratio_vs_standalone"] \
            <= ours["ratio_vs_standalone_max"]
        for name in (infer.REFERENCE, "stand-alone openvino bf16", "resnetlab torch bf16"):
            assert "ratio_vs_standalone_min" not in case[name]  # no stand-alone counterpart
    table = infer.report(res)
    ours = res["cases"]["resnet18 batch 1"]["resnetlab openvino bf16"]
    assert "per-round range" in table
    assert (f"{ours['ratio_vs_standalone_min']:.2f}-{ours['ratio_vs_standalone_max']:.2f}x"
            in table)
