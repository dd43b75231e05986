"""Graph capture: the compressed PyTorch model as ONNX, compressed layers left as markers.

torch.onnx.export (TorchScript tracer: it keeps custom-domain nodes where the torch.export-based
exporter inlines them) runs the reference model with every compressed layer wrapped so that it
computes its float result but exports as one `spfq.capture::Layer` node (attribute `name`, the
layer's input and output). The flavour builders (custom ops, stock, QONNX) then replace each
marker with their own nodes. Everything else (attention, LayerNorm, GELU, pooling) is exported
by torch as standard ONNX, with dynamic axes.
"""

from __future__ import annotations

import io
import warnings

import onnx
import torch
import torch.nn.functional as F
from torch import nn

from ...compress.capture import conv_output_size
from ...compressed import CompressedModel
from ...errors import SpfqError
from ...reference import replace_module
from ..source import ExportInputs

CAPTURE_DOMAIN = "spfq.capture"
OPSET = 20  # what torch's TorchScript exporter writes; flavours raise it to GRAPH_OPSET
GRAPH_OPSET = 21  # blocked / int4 DequantizeLinear (stock flavour); every flavour uses one opset
IR_VERSION = 10  # onnxruntime 1.31 loads IR <= 11; onnx 1.23 would write 12+


class _Marker(torch.autograd.Function):
    """Computes the layer in float; exports as spfq.capture::Layer(x) with the layer's name."""

    @staticmethod
    def forward(ctx, x, weight, bias, name, kind, conv):
        if kind == "linear":
            return F.linear(x, weight, bias)
        fn = F.conv1d if kind == "conv1d" else F.conv2d
        return fn(x, weight, bias, conv["stride"], conv["padding"], conv["dilation"], conv["groups"])

    @staticmethod
    def symbolic(g, x, weight, bias, name, kind, conv):
        out = g.op(f"{CAPTURE_DOMAIN}::Layer", x, name_s=name)
        sizes = x.type().varyingSizes() if x.type().kind() == "TensorType" else None
        n = weight.type().varyingSizes()[0] if weight.type().kind() == "TensorType" else None
        if sizes is not None and n is not None:
            if kind == "linear":
                shape = list(sizes[:-1]) + [n]
            else:
                spatial = [None if s is None else conv_output_size(s, k, st, p, d) for s, k, st, p, d in
                           zip(sizes[2:], conv["kernel_size"], conv["stride"], conv["padding"], conv["dilation"])]
                shape = [sizes[0], n] + spatial
            out.setType(x.type().with_sizes(shape))
        return out


class _Captured(nn.Module):
    def __init__(self, module: nn.Module, name: str, kind: str, conv: dict | None):
        super().__init__()
        self.inner, self.layer_name, self.kind, self.conv = module, name, kind, conv

    def forward(self, x):
        return _Marker.apply(x, self.inner.weight, self.inner.bias, self.layer_name, self.kind, self.conv)


def capture(model: nn.Module, cm: CompressedModel, inputs: ExportInputs) -> onnx.ModelProto:
    """ONNX graph of the reference `model` with a marker node per compressed layer."""
    model = _wrap(model, cm)
    buf = io.BytesIO()
    with warnings.catch_warnings(), torch.no_grad():
        warnings.simplefilter("ignore")
        try:
            torch.onnx.export(model, inputs.args, buf, dynamo=False, opset_version=OPSET,
                              input_names=inputs.input_names, output_names=inputs.output_names,
                              dynamic_axes=inputs.dynamic_axes, do_constant_folding=True,
                              custom_opsets={CAPTURE_DOMAIN: 1} if cm.layers else None)
        except Exception as exc:  # torch raises many types; the first line says what failed
            raise SpfqError(f"ONNX export of the model failed: {str(exc).splitlines()[0]}") from None
    proto = onnx.load_from_string(buf.getvalue())
    found = {a.s.decode() for n in proto.graph.node if n.domain == CAPTURE_DOMAIN for a in n.attribute}
    lost = sorted(set(cm.layers) - found)
    if lost:
        raise SpfqError(f"compressed layer '{lost[0]}' is not on the model's forward path; cannot export it")
    return proto


def _wrap(model: nn.Module, cm: CompressedModel) -> nn.Module:
    import copy

    model = copy.deepcopy(model).eval()
    for name, layer in cm.layers.items():
        replace_module(model, name, _Captured(model.get_submodule(name), name, layer.kind, layer.conv))
    return model
