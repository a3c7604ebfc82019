"""`resnetlab bench train --profile CONTENDER`: where one contender's training step spends
its time.

After a warm-up, N steps run under torch.profiler (CPU activity, recording input dtypes so
that casts can be told from other copies). Each op's self CPU time (its time less its
children's, so nothing counts twice) goes to one category, by the op and the ops it ran
inside (`category`); the steps' own self time (Python and bookkeeping between ops) is
"other". The profiler adds a little time to every op, so the wall per step here is above
what the timed benchmark measures.
"""

from __future__ import annotations

import time
from collections import Counter
from collections.abc import Callable, Iterable, Sequence
from typing import Any

from torch.autograd.profiler_util import FunctionEvent
from torch.profiler import ProfilerActivity, profile, record_function

from ..tables import format_table

DATA_SCOPE = "bench: next batch"  # what the contenders name their batch fetch
STEP_SCOPE = "bench: step"
CATEGORIES = ("convolution", "batch norm", "activation", "add/elementwise", "dtype cast",
              "optimizer", "loss", "data", "other")
TOP_OPS = 5  # the ops listed per category in the JSON output

_ENGINE = "autograd::engine::evaluate_function: "  # the autograd engine's wrapper per node
_CASTS = {"aten::to", "aten::_to_copy", "aten::copy_", "ToCopyBackward0"}
_SCOPES = ("data", "optimizer")
# Substrings of lower-cased op names (aten ops, autograd nodes such as ConvolutionBackward0,
# resnetlab's fused kernels resnetlab::bn_act_forward/backward); the first match wins.
_KEYS = (("convolution", ("convolution", "conv2d")),
         ("batch norm", ("batch_norm", "batchnorm", "bn_act")),
         ("loss", ("cross_entropy", "nll_loss", "nllloss", "log_softmax", "logsoftmax")),
         ("activation", ("relu", "threshold")))
_ELEMENTWISE = {f"aten::{op}{suffix}" for op in ("add", "sub", "mul", "div")
                for suffix in ("", "_")} | {"aten::fill_", "aten::zero_", "aten::where",
                                            "addbackward0", "subbackward0", "mulbackward0",
                                            "divbackward0"}


def _own(name: str) -> str | None:
    """The category an op's name gives it alone (None: none of its own)."""
    n = name.removeprefix(_ENGINE)
    if n == DATA_SCOPE or n.startswith("enumerate(DataLoader)"):
        return "data"
    if n.startswith(("Optimizer.", "aten::_foreach_", "aten::_fused_sgd", "aten::_fused_adam")):
        return "optimizer"
    low = n.lower()
    for cat, keys in _KEYS:
        if any(k in low for k in keys):
            return cat
    return "add/elementwise" if low in _ELEMENTWISE else None


def category(chain: Sequence[str], in_cast: bool = False) -> str:
    """The category of the last op of `chain`: the names of an op and of the ops it ran
    inside, outermost first. `in_cast`: the op is, or runs inside, a cast that changes
    dtype (aten::to, aten::_to_copy, ToCopyBackward0, or the copy_ inside them).

    In this order: everything inside the batch fetch is data and everything inside an
    optimizer call is optimizer (its foreach additions are not the model's additions);
    casts count as casts wherever they run, since autocast runs them inside the op they
    feed (aten::conv2d); the autograd engine's own additions (it sums the gradients of a
    tensor used twice, as a residual block's input is) are additions. Any other op goes
    with the outermost operator it runs in (aten::..., resnetlab::...): that operator's
    category, or "other" if it has none, so that the helpers a convolution or a batch norm
    calls (empty, fill_, copy_) count with it, and the zero_ inside avg_pool2d_backward is
    not an addition. Regions that are not operators (the step, torch.compile's regions,
    autograd's wrapper per node) leave the question to what runs inside them unless their
    own name has a category (ConvolutionBackward0).
    """
    owns = [_own(n) for n in chain]
    scope = next((c for c in owns if c in _SCOPES), None)
    if scope is not None:
        return scope
    if in_cast:
        return "dtype cast"
    if len(chain) > 1 and chain[-2].startswith(_ENGINE) and chain[-1] in ("aten::add",
                                                                          "aten::add_"):
        return "add/elementwise"
    for name, own in zip(chain, owns, strict=True):
        if own is not None:
            return own
        if "::" in name and not name.startswith(_ENGINE):
            return "other"
    return "other"


def _changes_dtype(e: FunctionEvent, memo: dict[int, bool]) -> bool:
    """Whether cast op `e` copies to another dtype: aten::to of a tensor already in that
    dtype returns it as it is, and a _to_copy may change only the memory format."""
    if id(e) not in memo:
        dtypes = getattr(e, "input_dtypes", None) or []
        memo[id(e)] = e.name.removeprefix(_ENGINE) in _CASTS and (
            (e.name == "aten::copy_" and len(dtypes) >= 2 and dtypes[0] != dtypes[1])
            or any(_changes_dtype(c, memo) for c in e.cpu_children))
    return memo[id(e)]


def tally(events: Iterable[FunctionEvent], steps: int, wall_s: float) -> dict[str, Any]:
    """Self CPU time per category, per step and as a share of all self time."""
    memo: dict[int, bool] = {}
    per_cat: dict[str, float] = dict.fromkeys(CATEGORIES, 0.0)
    per_op: dict[str, Counter[str]] = {c: Counter() for c in CATEGORIES}
    p: FunctionEvent | None
    for e in events:
        chain: list[str] = []
        in_cast, p = False, e
        while p is not None:
            chain.append(p.name)
            in_cast = in_cast or _changes_dtype(p, memo)
            p = p.cpu_parent
        cat = category(chain[::-1], in_cast)
        per_cat[cat] += e.self_cpu_time_total
        per_op[cat][e.name] += e.self_cpu_time_total
    total = sum(per_cat.values())
    ms = 1e-3 / steps  # profiler times are microseconds
    return {
        "steps": steps, "wall_ms_per_step": 1e3 * wall_s / steps, "ops_ms_per_step": total * ms,
        "categories": {c: {"ms_per_step": t * ms, "percent": 100 * t / total if total else 0.0,
                           "top_ops": {k: v * ms for k, v in per_op[c].most_common(TOP_OPS)}}
                       for c, t in per_cat.items()}}


def profile_steps(step: Callable[[], int], steps: int, warmup: int = 2) -> dict[str, Any]:
    """`tally` of `steps` calls of `step` under the profiler, after `warmup` calls."""
    for _ in range(warmup):
        step()
    with profile(activities=[ProfilerActivity.CPU], record_shapes=True) as prof:
        t0 = time.perf_counter()
        for _ in range(steps):
            with record_function(STEP_SCOPE):
                step()
        wall = time.perf_counter() - t0
    return tally(prof.events(), steps, wall)


def format_profile(table: dict[str, Any]) -> str:
    rows = [[c, f"{r['ms_per_step']:.1f}", f"{r['percent']:.1f}%"]
            for c, r in table["categories"].items()]
    rows.append(["total (ops' self time)", f"{table['ops_ms_per_step']:.1f}", "100.0%"])
    return (f"{table['steps']} steps, {table['wall_ms_per_step']:.1f} ms wall per step "
            "under the profiler\n"
            + format_table(["category", "ms per step", "% of step"], rows, markdown=True))
