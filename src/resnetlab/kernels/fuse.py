"""Where the fused kernels apply: a graph rewrite of a model for CPU training.

The models are written as torchvision writes them (`relu(bn(x))`, `relu(bn(x) + shortcut)`)
and import nothing of this package. For training, `fuse_bn_act` traces a model with
torch.fx and replaces every BatchNorm2d whose only use is a ReLU, directly or through one
addition, by `bn_act_or_eager`: the fused kernel where `usable` allows (a training-mode BN
on a CPU float32 or bfloat16 channels_last batch, no hooks), PyTorch's own ops otherwise. The traced
module shares the model's parameters and buffers, so the trainer steps it and saves,
evaluates and checkpoints the model itself.
"""

from __future__ import annotations

import logging
import operator

import torch
import torch.nn.functional as F
from torch import fx, nn

from . import available, bn_act, usable

log = logging.getLogger(__name__)

_RELU = (F.relu, torch.relu)


def bn_act_or_eager(bn: nn.BatchNorm2d, x: torch.Tensor, add: torch.Tensor | None = None
                    ) -> torch.Tensor:
    """relu(bn(x) + add): one fused kernel where usable, else PyTorch's ops (which run the
    BN's hooks, so a hooked BN is never fused)."""
    if usable(bn, x, add):
        return bn_act(bn, x, add)
    out = bn(x)
    return F.relu(out if add is None else out + add)


def _is_relu(node: fx.Node, modules: dict[str, nn.Module]) -> bool:
    if node.op == "call_function":
        return node.target in _RELU and not node.kwargs.get("inplace", False)
    if node.op == "call_module":
        m = modules[str(node.target)]
        return type(m) is nn.ReLU and not (m._forward_hooks or m._forward_pre_hooks)
    return False


def _sole_user(node: fx.Node) -> fx.Node | None:
    return next(iter(node.users)) if len(node.users) == 1 else None


def _rewrite(graph: fx.Graph, modules: dict[str, nn.Module]) -> int:
    """Replace bn -> relu and bn -> add -> relu chains; returns how many."""
    count = 0
    for node in list(graph.nodes):
        if not (node.op == "call_module" and type(modules[str(node.target)]) is nn.BatchNorm2d):
            continue
        user = _sole_user(node)
        add, relu = None, user
        if user is not None and user.op == "call_function" and user.target is operator.add \
                and user.args[0] is node and len(user.args) == 2:
            add, relu = user.args[1], _sole_user(user)
        if relu is None or not _is_relu(relu, modules):
            continue
        with graph.inserting_before(relu):
            bn = graph.get_attr(str(node.target))
            fused = graph.call_function(bn_act_or_eager, (bn, node.args[0], add))
        relu.replace_all_uses_with(fused)
        graph.erase_node(relu)
        if add is not None and user is not None:
            graph.erase_node(user)
        graph.erase_node(node)
        count += 1
    return count


class _Tracer(fx.Tracer):
    """fx's tracer, keeping BatchNorm subclasses (a frozen fine-tuning part's) as module
    calls like nn's own, instead of tracing into their data-dependent checks."""

    def is_leaf_module(self, m: nn.Module, module_qualified_name: str) -> bool:
        return isinstance(m, nn.modules.batchnorm._BatchNorm) or \
            super().is_leaf_module(m, module_qualified_name)


def fuse_bn_act(model: nn.Module) -> nn.Module | None:
    """`model` traced with its BN(+add)+ReLU chains on the fused kernels, sharing its
    parameters; None where the kernels are unavailable (no C compiler) or the model
    cannot be traced."""
    if not available():
        return None
    try:
        traced = fx.GraphModule(model, _Tracer().trace(model), type(model).__name__)
    except Exception as e:  # data-dependent control flow in a custom model
        log.warning("fused BN-ReLU kernels off: %s cannot be traced (%s)",
                    type(model).__name__, e)
        return None
    count = _rewrite(traced.graph, dict(traced.named_modules()))
    traced.graph.lint()
    traced.recompile()
    # The same parameters in the same order: the optimizer, gradient clipping and DDP's
    # buckets then see exactly what they would see on the model itself.
    if [id(p) for p in traced.parameters()] != [id(p) for p in model.parameters()]:
        log.warning("fused BN-ReLU kernels off: the traced %s orders its parameters "
                    "differently", type(model).__name__)
        return None
    log.debug("fused %d BN-ReLU chains", count)
    return traced
