"""Sequential propagation: the float and the compressed model each run once, node by node.

The replay engine (engine.py) re-runs both models from the input up to every layer, so its
cost grows with depth squared. Here the model is captured once with torch.export (ATen graph,
parameters as inputs, shapes symbolic where the code allows); the graph is walked in execution
order and every node is evaluated for all calibration batches before the next one, holding only
the values still needed later (the live set across the cut, residual branches included). The
float and the compressed model are the same graph with two parameter bindings. At a compressed
layer both models' inputs are at hand: the Gram matrices are accumulated from them, the layer
(and the layers reading the same input) is compressed, and only then does the frontier move
past it. Each layer sees its calibration inputs once for X and once for X~, and the arithmetic
is the replay engine's (the same ATen kernels on the same batches), so the codes are equal.

`plan()` raises NotTraceable with the reason when a model cannot take this path (the caller
falls back to the replay engine).
"""

from __future__ import annotations

import contextlib
import inspect
import io
import logging
import warnings
from dataclasses import dataclass
from typing import Callable, Iterator

import torch
import torch.fx as fx
import torch.utils._pytree as pytree
from torch import nn
from torch.export import Dim
from torch.export.graph_signature import InputKind

from .activations import ActivationStore

LAYER_OPS = {"linear": "aten.linear.default", "conv1d": "aten.conv1d.default", "conv2d": "aten.conv2d.default"}


class NotTraceable(Exception):
    """The model cannot take the sequential path; the message says why (one line)."""


@dataclass
class Plan:
    owner: nn.Module  # resolves get_attr nodes (sub-graphs of higher-order ops)
    inputs: dict  # placeholder node -> ("user", i) | ("param", target) | ("const", value)
    in_spec: object  # pytree spec of (args, kwargs) the graph was captured with
    shapes: list  # per user input: tuple of int (static) or (lo, hi) ranges (symbolic)
    layers: dict  # fx node -> layer name (a compressed layer's call: evaluated by its module)
    leaders: dict  # fx node -> the group (layer names) compressed when the frontier reaches it
    needed: list  # nodes evaluated, in order (ancestors of the compressed layers' inputs)
    last_use: dict  # node -> index in `needed` after which its value is dropped


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return f"{type(exc).__name__}: {text.splitlines()[0]}" if text else type(exc).__name__


def as_call(batch) -> tuple[tuple, dict]:
    """(args, kwargs) of the forward call for a batch, as calibration.call makes it."""
    if isinstance(batch, dict):
        return (), dict(batch)
    return (batch if isinstance(batch, tuple) else (batch,)), {}


def _dims(x, axes):
    return {i: Dim.AUTO for i in range(x.dim()) if axes is None or i in axes} if isinstance(x, torch.Tensor) else None


_QUIET = ("torch._export.non_strict_utils", "torch.export", "torch._dynamo", "torch._subclasses.fake_tensor",
          "torch.fx.experimental.symbolic_shapes")


def _export(model: nn.Module, batch):
    """torch.export with every input axis left to it (Dim.AUTO), else only the batch axis, else
    static shapes: AUTO still fails on some models (a flatten feeding a Linear)."""
    args, kwargs = as_call(batch)
    try:
        bound = inspect.signature(model.forward).bind(*args, **kwargs).arguments
    except (TypeError, ValueError):
        bound = None
    quiet = [logging.getLogger(n) for n in _QUIET]
    levels = [lg.level for lg in quiet]
    first = None
    try:
        # "dimension ... specialized" notes and fake-tensor errors are logged, not raised: mute them
        for lg in quiet:
            lg.setLevel(logging.CRITICAL)
        for axes in ((None, (0,), ()) if bound is not None else ((),)):
            dynamic = {k: pytree.tree_map(lambda x: _dims(x, axes), v) for k, v in bound.items()} if axes != () \
                else None
            try:
                # a failed capture also prints the partial graph to stderr: nothing stray on a clean run
                with warnings.catch_warnings(), contextlib.redirect_stderr(io.StringIO()), \
                        contextlib.redirect_stdout(io.StringIO()):
                    warnings.simplefilter("ignore")
                    return torch.export.export(model, args, kwargs, dynamic_shapes=dynamic, strict=False)
            except Exception as exc:  # noqa: BLE001 - any capture failure means: try less, then replay
                first = first or exc
    finally:
        for lg, level in zip(quiet, levels):
            lg.setLevel(level)
    raise NotTraceable(f"torch.export cannot capture it ({_first_line(first)})")


def _finite(bound) -> int | None:
    """A range bound as an int; None for an infinite one (sympy's oo, torch's int_oo)."""
    try:
        return int(bound)
    except (TypeError, ValueError, OverflowError, AttributeError):
        return None


def sample_batch(batches: list):
    """The batch to capture the graph from: the first with the most dims > 1 (torch.export
    specialises a dim of size 0 or 1, so a batch of 1 sentence would fix the batch axis)."""
    def score(batch):
        return sum(d > 1 for x in pytree.tree_leaves(as_call(batch)) if isinstance(x, torch.Tensor) for d in x.shape)
    return max(batches, key=score)


def _shape_rule(val, ranges) -> tuple:
    """Per dim of a user input: an int that every batch must have, or the (lo, hi) the graph
    was captured for (torch.export's 0/1 specialisation assumes >= 2; a 1 runs the same ops)."""
    out = []
    for d in val.shape:
        if isinstance(d, int):
            out.append(d)
            continue
        r = ranges.get(d.node.expr)
        lo = 1 if r is None else min(int(r.lower), 1)
        hi = None if r is None else _finite(r.upper)
        out.append((lo, hi))
    return tuple(out)


def plan(model: nn.Module, batch, groups: list[list[str]]) -> Plan:
    """Capture `model` and map the replay engine's groups (from an eager run) onto graph nodes."""
    ep = _export(model, batch)
    sig = ep.graph_signature
    if sig.buffers_to_mutate or sig.user_inputs_to_mutate:
        raise NotTraceable("its forward updates buffers or inputs in place")
    graph = ep.graph
    nodes = list(graph.nodes)
    phs = [n for n in nodes if n.op == "placeholder"]
    ranges = {k: v for k, v in ep.range_constraints.items()}
    inputs, shapes, weight_node = {}, [], {}
    user = 0
    for node, spec in zip(phs, sig.input_specs):
        if spec.kind == InputKind.USER_INPUT:
            inputs[node] = ("user", user)
            val = node.meta.get("val")
            shapes.append(_shape_rule(val, ranges) if isinstance(val, torch.Tensor) else None)
            user += 1
        elif spec.kind in (InputKind.PARAMETER, InputKind.BUFFER):
            inputs[node] = ("param", spec.target)
            weight_node[spec.target] = node
        elif spec.kind == InputKind.CONSTANT_TENSOR:
            inputs[node] = ("const", ep.constants[spec.target])
        else:
            raise NotTraceable(f"its graph takes an input of kind {spec.kind.name}")
    mods = dict(model.named_modules())
    layers, calls = {}, {}
    for g in groups:
        for name in g:
            w = weight_node.get(f"{name}.weight")
            users = list(w.users) if w is not None else []
            kind = "linear" if isinstance(mods[name], nn.Linear) else type(mods[name]).__name__.lower()
            if len(users) != 1 or str(users[0].target) != LAYER_OPS.get(kind) or users[0].args[1] is not w:
                raise NotTraceable(f"layer '{name}' does not appear as one {LAYER_OPS.get(kind, kind)} call in the graph")
            layers[users[0]] = name
            calls[name] = users[0]
    order = [layers[n] for n in nodes if n in layers]
    if order != [n for g in groups for n in g]:
        raise NotTraceable("its captured layer order differs from the eager run (data-dependent control flow)")
    leaders = {}
    for g in groups:
        lead = calls[g[0]]
        if not isinstance(lead.args[0], fx.Node) or any(calls[n].args[0] is not lead.args[0] for n in g):
            raise NotTraceable(f"layers of the group {g} do not read one graph value")
        leaders[lead] = g
    # evaluate only what a layer's input depends on (and in-place ops on such values), nothing
    # after the last compressed layer; drop each value after its last use among those nodes
    need: set[fx.Node] = {lead.args[0] for lead in leaders}
    stop = max(nodes.index(lead) for lead in leaders)
    for node in reversed(nodes[:stop]):
        mutates = node.op == "call_function" and getattr(getattr(node.target, "_schema", None), "is_mutable", False)
        if node in need or (mutates and any(a in need for a in node.all_input_nodes)):
            need.add(node)
            need.update([node.args[0]] if node in layers else node.all_input_nodes)
    needed = [n for n in nodes[:stop + 1] if n in need or n in leaders]
    index = {n: i for i, n in enumerate(needed)}
    last_use = {n: index[n] for n in needed}
    for n in needed:
        for a in n.all_input_nodes:
            if a in index:
                last_use[a] = max(last_use[a], index[n])
    return Plan(ep.graph_module, inputs, ep.call_spec.in_spec, shapes, layers, leaders, needed, last_use)


def user_inputs(pl: Plan, batch, index: int) -> list:
    """The graph's user inputs for one batch; NotTraceable when its structure or a shape is one
    the captured graph does not cover."""
    leaves, spec = pytree.tree_flatten(as_call(batch))
    if spec != pl.in_spec:
        raise NotTraceable(f"calibration batch {index} is structured unlike the others")
    for i, (x, rule) in enumerate(zip(leaves, pl.shapes)):
        if rule is None:
            continue
        ok = isinstance(x, torch.Tensor) and x.dim() == len(rule) and all(
            (d == r) if isinstance(r, int) else (d >= r[0] and (r[1] is None or d <= r[1]))
            for d, r in zip(x.shape, rule))
        if not ok:
            shape = tuple(x.shape) if isinstance(x, torch.Tensor) else type(x).__name__
            raise NotTraceable(f"calibration batch {index} has input {i} of shape {shape}; the graph "
                               f"captured from the calibration is specialised to {rule}")
    return leaves


def check_batches(pl: Plan, batches: list) -> None:
    for i, batch in enumerate(batches):
        user_inputs(pl, batch, i)


class _Runner:
    """Evaluates graph nodes for one model (float or compressed): parameters bound from it,
    compressed layers called as its modules (so a bias added by bias correction is used)."""

    def __init__(self, pl: Plan, model: nn.Module):
        self.pl, self.model = pl, model
        self.mods = dict(model.named_modules())

    def placeholder(self, spec, leaves):
        kind, what = spec
        if kind == "user":
            return leaves[what]
        if kind == "param":
            owner, _, attr = what.rpartition(".")
            return getattr(self.model.get_submodule(owner) if owner else self.model, attr)
        return what

    def __call__(self, node: fx.Node, args, kwargs):
        if node in self.pl.layers:
            return self.mods[self.pl.layers[node]](args[0])
        if node.op == "call_function":
            return node.target(*args, **kwargs)
        if node.op == "get_attr":
            obj = self.pl.owner
            for part in node.target.split("."):
                obj = getattr(obj, part)
            return obj
        raise NotTraceable(f"unexpected graph node {node.op} {node.target}")


def propagate(pl: Plan, float_model: nn.Module, qmodel: nn.Module, batches: list,
              at_layer: Callable[[list[str], Iterator], None], on_error: Callable[[Exception, int], Exception],
              store: ActivationStore) -> None:
    """Walk the plan: every needed node for every batch, in the float and the compressed model.

    At a leader node `at_layer(group, inputs)` gets an iterator of (batch index, x, x~) (the
    group's input in the float and the compressed model) and compresses the group, updating
    qmodel's weights, before the node itself runs. `on_error(exc, batch_index)` turns an error
    of the model's code into the error to raise."""
    runners = (_Runner(pl, float_model), _Runner(pl, qmodel))
    envs: tuple[dict, dict] = ({}, {})
    leaves = [user_inputs(pl, batch, b) for b, batch in enumerate(batches)]
    try:
        for i, node in enumerate(pl.needed):
            if node in pl.leaders:
                src = node.args[0]
                at_layer(pl.leaders[node], _settled(store, ((b, envs[0][src][b], envs[1][src][b])
                                                            for b in range(len(batches)))))
            if node.op == "placeholder":
                spec = pl.inputs[node]  # parameters and constants are not activations: not counted
                keep = store.keep if spec[0] == "user" else (lambda v: v)
                vals = [[keep(r.placeholder(spec, lv)) for lv in leaves] for r in runners]
            else:
                vals = [_evaluate(node, runner, env, len(batches), on_error, store) for runner, env in zip(runners, envs)]
            for env, v in zip(envs, vals):
                env[node] = v
            for a in [node, *node.all_input_nodes]:
                if pl.last_use.get(a) == i and a in envs[0]:
                    for env in envs:
                        for v in env.pop(a):
                            store.release(v)
    finally:
        for env in envs:
            for vs in env.values():
                for v in vs:
                    store.release(v)
            env.clear()


def _evaluate(node: fx.Node, runner: _Runner, env: dict, n_batches: int, on_error, store: ActivationStore) -> list:
    out = []
    for b in range(n_batches):
        if node in runner.pl.layers:  # called as the model's module: its input alone
            args, kwargs = (env[node.args[0]][b],), {}
        else:
            args = fx.node.map_arg(node.args, lambda n: env[n][b])
            kwargs = fx.node.map_arg(node.kwargs, lambda n: env[n][b])
        try:
            with torch.no_grad():
                out.append(store.keep(runner(node, args, kwargs)))
        except (KeyboardInterrupt, NotTraceable):
            raise
        except Exception as exc:  # noqa: BLE001 - the model rejected the data: one line, by the caller
            raise on_error(exc, b) from None
        store.settle([env[a][b] for a in node.all_input_nodes if a in env])  # spilled inputs: pages out again
    return out


def _settled(store: ActivationStore, items):
    """The (batch, x, x~) items of a leader's input, each settled once the consumer moves on."""
    for item in items:
        yield item
        store.settle(item[1:])
