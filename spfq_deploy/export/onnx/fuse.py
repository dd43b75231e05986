"""Activation fusion of the custom flavour: the activations right after a packed layer become
its epilogue, applied by the kernels to each block of outputs while it is in cache, so the
output is written once instead of written, read and written again by separate nodes:

- ReLU / ReLU6 / Clip (constant bounds) -> clip_min / clip_max (spfq_set_clamp);
- then HardSwish, SiLU (Sigmoid(y) * y), or PRelu with a constant slope per output channel (or
  one for all) -> fused_activation "hardswish" / "silu" / "prelu" + prelu_slope
  (spfq_set_activation, kernels/src/act.c), applied after the clamp.

Only where the packed node's output (and each absorbed node's) has no other consumer and is not
a graph output. validate's per-layer checks apply the same epilogue to the reference
(validate/layers.py fused_epilogues).
"""

from __future__ import annotations

import math

import numpy as np
import onnx
from onnx import helper, numpy_helper

from .layout import constants

CLAMPS = ("Relu", "Clip")


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
        if n.op_type not in ops or n.domain != domain:
            continue
        have = {a.name for a in n.attribute}
        while True:
            absorbed = _next(n, have, consumers, outputs, consts)
            if absorbed is None:
                break
            nodes, attrs = absorbed
            for k, v in attrs.items():
                n.attribute.append(helper.make_attribute(k, v))
                have.add(k)
            have.add("clip_min" if nodes[0].op_type in CLAMPS else "fused_activation")
            n.output[0] = nodes[-1].output[0]
            drop.update(id(x) for x in nodes)
            fused += len(nodes)
    kept = [n for n in g.node if id(n) not in drop]
    del g.node[:]
    g.node.extend(kept)
    return fused


def _next(n, have: set, consumers: dict, outputs: set, consts: dict):
    """(nodes absorbed, attributes) of the activation after packed node n, or None."""
    y = n.output[0]
    users = consumers.get(y, [])
    if y in outputs or not users or any(u.domain for u in users):
        return None
    done_clamp = "clip_min" in have or "clip_max" in have
    if len(users) == 1 and users[0].op_type in CLAMPS:
        if done_clamp or "fused_activation" in have:  # a clamp after the activation: not ours
            return None
        bounds = _bounds(users[0], consts)
        if bounds is None:
            return None
        attrs = {}
        if not math.isinf(bounds[0]):
            attrs["clip_min"] = bounds[0]
        if not math.isinf(bounds[1]):
            attrs["clip_max"] = bounds[1]
        return [users[0]], attrs
    if "fused_activation" in have:
        return None
    if len(users) == 1 and users[0].op_type == "HardSwish":
        return [users[0]], {"fused_activation": "hardswish"}
    if len(users) == 1 and users[0].op_type == "PRelu":
        slope = _channel_slope(n, users[0], consts)
        return None if slope is None else ([users[0]], {"fused_activation": "prelu", "prelu_slope": slope})
    if len(users) == 2:  # SiLU: Sigmoid(y) * y
        sig = next((u for u in users if u.op_type == "Sigmoid"), None)
        mul = next((u for u in users if u.op_type == "Mul"), None)
        if sig is None or mul is None or sig.output[0] in outputs:
            return None
        if sorted(mul.input) != sorted([y, sig.output[0]]) or [u.op_type for u in consumers.get(sig.output[0], [])] != ["Mul"]:
            return None
        return [sig, mul], {"fused_activation": "silu"}
    return None


def _channel_slope(n, prelu, consts) -> list[float] | None:
    """PRelu's constant slope as one value per output channel of packed node n (channel axis 1
    of a conv's NCHW output, the last axis of a matmul's), or None if it varies otherwise."""
    if prelu.input[0] != n.output[0] or len(prelu.input) < 2:
        return None
    slope = consts.get(prelu.input[1])
    if slope is None:
        return None
    attrs = {a.name: a for a in n.attribute}
    N = attrs["out_features"].i
    if slope.size == 1:
        return [float(slope.reshape(()))] * N
    if n.op_type == "PackedConv":
        rank = len(attrs["kernel_shape"].ints) + 2
        if slope.ndim > rank:
            return None
        full = slope.reshape((1,) * (rank - slope.ndim) + slope.shape)
        per = full.reshape(-1) if full.shape[1] == N and full.size == N else None
    else:
        per = slope.reshape(-1) if slope.shape[-1] == N and slope.size == N else None
    return None if per is None else [float(v) for v in np.asarray(per, np.float32)]


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
