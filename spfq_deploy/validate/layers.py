"""Per-layer checks of an ONNX artifact: where it first diverges from the reference.

Method: each compressed layer's input and output tensors in the artifact's graph are found from
the manifest's layer names (the flavour builders name every tensor inside a layer's replacement
`<layer>.<what>`; the first tensor a layer's nodes produce that is not so named is the layer's
output, the one non-initializer input they read that is not so named its input) and added as
extra graph outputs. Two comparisons per layer:

- local: the artifact's layer output against the reference layer (the dequantised nn.Module,
  or spfq_deploy.reference.Int8ActivationLayer for int8 activations) applied to the artifact's
  own input of that layer. Exact kernels make this tight (tolerances.layer_rel_err) whatever
  happened upstream; it is what decides the first diverging layer and fails the row.
- accumulated: the artifact's layer output against the reference model's output of that layer
  captured by a forward hook (shows how error grows along the network).

The first diverging layer is the first (in graph order) whose local check fails; when every
layer passes locally but the row fails end to end, the first layer whose accumulated error
breaks the row's end-to-end tolerance.
"""

from __future__ import annotations

import numpy as np
import onnx
import torch
from onnx import TensorProto, helper

from . import metrics


def _out(node: onnx.NodeProto) -> str:
    """A node's output tensor: the first one present (an int8 PackedConv output leaves slot 0 empty)."""
    return next((t for t in node.output if t), "")


def q8_scales(model: onnx.ModelProto) -> dict[str, str]:
    """{int8 tensor: its per-pixel scale tensor} of the int8 edges (export/onnx/q8.py)."""
    from ..export.onnx.q8 import X_Q, X_SCALE, Y_Q, Y_SCALE

    out = {}
    for n in model.graph.node:
        if n.op_type == "PackedConv":
            if len(n.output) > Y_SCALE and n.output[Y_Q]:
                out[n.output[Y_Q]] = n.output[Y_SCALE]
            if len(n.input) > X_SCALE and n.input[X_Q]:
                out[n.input[X_Q]] = n.input[X_SCALE]
    return out


def dequantize_q8(model: onnx.ModelProto, values: dict) -> tuple[dict, dict]:
    """(values with every int8 edge tensor dequantised as float32 scale * q, {tensor: its
    quantisation step per element}): the form the per-layer checks compare."""
    values, steps = dict(values), {}
    for q, s in q8_scales(model).items():
        if q in values and s in values:
            scale = values[s][..., None].astype(np.float32)
            values[q] = scale * values[q].astype(np.float32)
            steps[q] = np.broadcast_to(scale, values[q].shape)
    return values, steps


def layer_tensors(model: onnx.ModelProto, layer_names) -> dict[str, tuple[str, str]]:
    """{layer: (input tensor, output tensor)} in graph order, for the layers found in the graph."""
    inits = {i.name for i in model.graph.initializer}
    names = sorted(layer_names, key=len, reverse=True)  # "a.b" before "a"

    def owner(tensor: str) -> str | None:
        return next((n for n in names if tensor.startswith(n + ".")), None)

    found: dict[str, tuple[str, str]] = {}
    inputs: dict[str, str] = {}
    for node in model.graph.node:
        owners = {owner(t) for t in node.input if t} - {None}
        for layer in owners:
            if layer in found:
                continue
            for t in node.input:
                if t and owner(t) is None and t not in inits:
                    inputs.setdefault(layer, t)
            out = _out(node)
            if owner(out) != layer:  # the first tensor not named after the layer: its output
                if layer in inputs:
                    found[layer] = (inputs[layer], out)
    return found


def with_layer_outputs(model: onnx.ModelProto, tensors: dict[str, tuple[str, str]]) -> onnx.ModelProto:
    """A copy of the model that also outputs every layer's input and output tensor."""
    m = onnx.ModelProto()
    m.CopyFrom(model)
    have = {o.name for o in m.graph.output} | {i.name for i in m.graph.input}
    scales = q8_scales(model)
    for x, y in tensors.values():
        for t in (x, y):
            for name, kind in ((t, TensorProto.INT8 if t in scales else TensorProto.FLOAT),
                               (scales.get(t), TensorProto.FLOAT)):
                if name and name not in have:
                    m.graph.output.append(helper.make_tensor_value_info(name, kind, None))
                    have.add(name)
    return m


def channels_first(model: onnx.ModelProto, values: dict) -> dict:
    """values with the NHWC tensors of channels-last PackedConv nodes (export/onnx/layout.py)
    transposed back to NCHW, the layout the reference layers compute in."""
    from ..export.onnx.layout import TO_FIRST
    from ..export.onnx.q8 import X_Q

    nhwc = {}
    for node in model.graph.node:
        if node.op_type == "PackedConv" and any(a.name == "channels_last" and a.i for a in node.attribute):
            for t in (node.input[0] or (node.input[X_Q] if len(node.input) > X_Q else ""), _out(node)):
                nhwc[t] = True
    out = dict(values)
    for t in nhwc:
        if t in out:
            out[t] = out[t].transpose(TO_FIRST[out[t].ndim])
    return out


class Epilogue:
    """The clamp and activation a layer's node has fused in (export/onnx/fuse.py): its output
    tensor is after them, so the reference gets the same ops (torch's, on the channel axis)."""

    def __init__(self, lo: float, hi: float, act: str = "", slope=None, axis: int = -1):
        self.lo, self.hi, self.act, self.axis = lo, hi, act, axis
        self.slope = None if slope is None else torch.tensor(np.asarray(slope, np.float32))

    def __call__(self, y: torch.Tensor) -> torch.Tensor:
        y = torch.clamp(y, self.lo, self.hi)
        if self.act == "hardswish":
            return torch.nn.functional.hardswish(y)
        if self.act == "silu":
            return torch.nn.functional.silu(y)
        if self.act == "prelu":
            shape = [1] * y.ndim
            shape[self.axis] = -1
            return torch.where(y > 0, y, self.slope.reshape(shape).to(y.dtype) * y)
        return y

    def numpy(self, y: np.ndarray) -> np.ndarray:
        return self(torch.from_numpy(np.ascontiguousarray(y))).numpy()


def fused_epilogues(model: onnx.ModelProto, tensors: dict[str, tuple[str, str]]) -> dict[str, Epilogue]:
    """{layer: Epilogue} for layers whose node has a fused clamp or activation."""
    by_output = {_out(n): n for n in model.graph.node if n.output}
    out = {}
    for name, (_, y) in tensors.items():
        node = by_output.get(y)
        attrs = {a.name: helper.get_attribute_value(a) for a in node.attribute} if node else {}
        act = attrs.get("fused_activation", b"")
        act = act.decode() if isinstance(act, bytes) else act
        if "clip_min" in attrs or "clip_max" in attrs or act:
            axis = 1 if node.op_type == "PackedConv" else -1  # the reference's (NCHW) channel axis
            out[name] = Epilogue(attrs.get("clip_min", -float("inf")), attrs.get("clip_max", float("inf")), act,
                                 attrs.get("prelu_slope"), axis)
    return out


class Fused(torch.nn.Module):
    """A reference layer followed by the epilogue its artifact fused in."""

    def __init__(self, inner, epilogue: Epilogue):
        super().__init__()
        self.inner, self.epilogue = inner, epilogue

    def forward(self, x):
        return self.epilogue(self.inner(x))


def hooked_outputs(model: torch.nn.Module, args, layer_names) -> tuple[list, dict]:
    """(model outputs, {layer: output}) of a torch model, layer outputs captured by hooks."""
    captured, handles = {}, []
    for name in layer_names:
        mod = model.get_submodule(name)
        handles.append(mod.register_forward_hook(
            lambda _m, _i, out, name=name: captured.__setitem__(name, out.detach().float().numpy())))
    try:
        with torch.no_grad():
            y = model(*args)
    finally:
        for h in handles:
            h.remove()
    return y, captured


def check(values: dict, tensors: dict, feeds: dict, ref_layer, hooked: dict, tol, row_tol,
          steps: dict | None = None) -> tuple[list, str | None]:
    """Per-layer rows and the first diverging layer. values: tensor name -> array from the
    artifact; ref_layer(name) -> the reference module of that layer; steps: the quantisation step
    per element of int8 edge outputs (dequantize_q8): such an output is right when it lies
    within half a step of the reference (the quantiser's rounding), plus the usual tolerance."""
    rows, first_local, first_acc = [], None, None
    steps = steps or {}
    for name, (x_name, y_name) in tensors.items():
        x = feeds[x_name] if x_name in feeds else values[x_name]
        y = values[y_name]
        with torch.no_grad():
            want = ref_layer(name)(torch.from_numpy(x)).float().numpy()
        if y_name in steps:  # move y toward want by up to half a step: what is left is the error
            half = steps[y_name] * np.float32(0.5 * (1 + 2 ** -20))
            y = np.where(np.abs(y - want) <= half, want, y - np.sign(y - want) * half).astype(np.float32)
        local = metrics.compare(y, want)
        row = {"layer": name, "local_max_rel_err": local["max_rel_err"],
               "local_ok": local["max_rel_err"] <= tol.layer_rel_err}
        if name in hooked and hooked[name].shape == y.shape:
            acc = metrics.compare(y, hooked[name])
            row.update(accumulated_max_rel_err=acc["max_rel_err"], accumulated_min_cosine=acc["min_cosine"])
            bad = (row_tol.max_rel_err is not None and not acc["max_rel_err"] <= row_tol.max_rel_err) \
                or not acc["min_cosine"] >= row_tol.min_cosine
            if bad and first_acc is None:
                first_acc = name
        if not row["local_ok"] and first_local is None:
            first_local = name
        rows.append(row)
    return rows, first_local or first_acc
