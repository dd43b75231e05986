"""Activation fusion of the custom flavour: a ReLU / ReLU6 / Clip right after a packed layer
becomes the layer's clip_min / clip_max attributes (the kernels apply the clamp in their
epilogue, spfq_set_clamp), so its output is written once instead of written, read and written
again by a separate node.

Only when the packed node's output has that one consumer and is not a graph output, and the
Clip bounds are constants. validate's per-layer checks clamp the reference the same way
(validate/layers.py fused_clamps).
"""

from __future__ import annotations

import math

import onnx
from onnx import helper, numpy_helper

from .layout import constants

FUSED = ("Relu", "Clip")


def fuse_activations(model: onnx.ModelProto, ops: tuple[str, ...], domain: str) -> int:
    """Rewrite model.graph in place; returns how many activation nodes were absorbed."""
    g = model.graph
    consts = {k: numpy_helper.to_array(v) for k, v in constants(g).items()}
    consumers: dict[str, list] = {}
    for n in g.node:
        for t in n.input:
            consumers.setdefault(t, []).append(n)
    outputs = {o.name for o in g.output}
    drop, fused = set(), 0
    for n in g.node:
        if n.op_type not in ops or n.domain != domain or any(a.name.startswith("clip_") for a in n.attribute):
            continue
        y = n.output[0]
        users = consumers.get(y, [])
        if y in outputs or len(users) != 1 or users[0].op_type not in FUSED or users[0].domain:
            continue
        act = users[0]
        bounds = _bounds(act, consts)
        if bounds is None:
            continue
        lo, hi = bounds
        if not math.isinf(lo):
            n.attribute.append(helper.make_attribute("clip_min", lo))
        if not math.isinf(hi):
            n.attribute.append(helper.make_attribute("clip_max", hi))
        n.output[0] = act.output[0]
        drop.add(id(act))
        fused += 1
    kept = [n for n in g.node if id(n) not in drop]
    del g.node[:]
    g.node.extend(kept)
    return fused


def _bounds(act, consts) -> tuple[float, float] | None:
    """(lo, hi) of a Relu or of a Clip with constant scalar bounds (missing: unbounded)."""
    if act.op_type == "Relu":
        return 0.0, math.inf
    vals = []
    for i, default in ((1, -math.inf), (2, math.inf)):
        name = act.input[i] if len(act.input) > i else ""
        if not name:
            vals.append(default)
            continue
        v = consts.get(name)
        if v is None or v.size != 1:
            return None
        vals.append(float(v.reshape(())))
    return (vals[0], vals[1]) if vals[0] <= vals[1] else None
