"""Int8 edges of the custom flavour: a compressed conv hands the next ones int8 tensors.

An int8 1x1 conv quantises its input per row, i.e. per pixel. When a channels-last PackedConv's
output feeds only such convs, that quantisation is done once, in the producer's epilogue while
the rows are in cache (spfq_matmul_act / spfq_dwconv_nhwc_act), and the edge carries int8 + one
float scale per pixel instead of floats: a quarter of the bytes cross memory, and the consumers
skip their own quantisation pass (MobileNetV2: every depthwise -> projection edge, and the
projection -> expansion edges without a residual). Values are bit-identical with the float
edges (the producer's quantiser is the consumer's, on the same float rows); validate reads the
int8 tensors back dequantised.

PackedConv inputs 7 / 8 are Xq / Xs (X itself then empty), outputs 1 / 2 Yq / Ys (output 0
then empty) with the attribute q8_output = 1 (kernels/ort/spfq_ort_ops.cc).
"""

from __future__ import annotations

from collections import defaultdict

import onnx
from onnx import helper

X_Q, X_SCALE = 7, 8  # PackedConv input slots of an int8 input and its scales
Y_Q, Y_SCALE = 1, 2  # output slots of an int8 output and its scales


def _attrs(n: onnx.NodeProto) -> dict:
    return {a.name: helper.get_attribute_value(a) for a in n.attribute}


def _kind(n: onnx.NodeProto) -> tuple[str | None, str]:
    """(kind, activation) of a channels-last PackedConv: kind 'pointwise' (1x1 stride 1, one
    group: its GEMM rows are pixels), 'depthwise', or None."""
    a = _attrs(n)
    act = a.get("activation", b"").decode()
    if not a.get("channels_last") or a.get("group_size"):  # group-wise scales: float edges only
        return None, act
    taps = 1
    for v in a.get("kernel_shape", []):
        taps *= v
    if a.get("group", 1) > 1 and a.get("in_features") == taps:
        return "depthwise", act
    if a.get("group", 1) == 1 and taps == 1 and all(v == 1 for v in a.get("strides", [])) and not any(a.get("pads", [])):
        return "pointwise", act
    return None, act


def _emits_q8(n: onnx.NodeProto) -> bool:
    """Can write its output quantised per pixel: an int8 1x1 conv, a depthwise conv."""
    kind, act = _kind(n)
    return (kind == "pointwise" and act == "int8") or kind == "depthwise"


def _takes_q8(n: onnx.NodeProto) -> bool:
    """Quantises its input per pixel itself: an int8 1x1 conv."""
    kind, act = _kind(n)
    return kind == "pointwise" and act == "int8"


def int8_edges(model: onnx.ModelProto, domain: str) -> int:
    """Rewrite model.graph in place; returns how many edges now carry int8."""
    g = model.graph
    convs = [n for n in g.node if n.domain == domain and n.op_type == "PackedConv"]
    uses = defaultdict(list)
    for n in g.node:
        for i, t in enumerate(n.input):
            if t:
                uses[t].append((n, i))
    protected = {o.name for o in g.output}
    edges = 0
    for p in convs:
        y = p.output[0] if p.output else ""
        if not y or y in protected or not _emits_q8(p) or not uses[y]:
            continue
        if not all(i == 0 and c.domain == domain and c.op_type == "PackedConv" and _takes_q8(c) for c, i in uses[y]):
            continue
        yq, ys = f"{y}:q8", f"{y}:scale"
        del p.output[:]
        p.output.extend(["", yq, ys])
        p.attribute.append(helper.make_attribute("q8_output", 1))
        for c, _ in uses[y]:
            ins = list(c.input) + [""] * (X_SCALE + 1 - len(c.input))
            ins[0], ins[X_Q], ins[X_SCALE] = "", yq, ys
            del c.input[:]
            c.input.extend(ins)
        edges += 1
    if edges:  # the float tensors are gone: drop what shape inference recorded for them
        live = {t for n in g.node for t in list(n.input) + list(n.output)}
        kept = [v for v in g.value_info if v.name in live]
        del g.value_info[:]
        g.value_info.extend(kept)
    return edges
