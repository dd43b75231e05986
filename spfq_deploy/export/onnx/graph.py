"""Replace the capture markers of a graph with a flavour's nodes, then pin opset and IR version.

A flavour is a function (layer, input name, output name) -> Replacement; everything about the
graph outside the compressed layers stays exactly as torch exported it.
"""

from __future__ import annotations

from dataclasses import dataclass, field
from typing import Callable

import numpy as np
import onnx
from onnx import helper, numpy_helper

from ...compressed import CompressedLayer, CompressedModel
from ...errors import SpfqError
from ..source import ExportInputs
from .capture import CAPTURE_DOMAIN, GRAPH_OPSET, IR_VERSION, capture


@dataclass
class Replacement:
    """The nodes and initializers that compute one compressed layer, plus what they record."""

    nodes: list = field(default_factory=list)
    initializers: list = field(default_factory=list)
    info: dict = field(default_factory=dict)  # goes to the manifest's per-layer entry

    def const(self, name: str, array: np.ndarray) -> str:
        self.initializers.append(numpy_helper.from_array(np.ascontiguousarray(array), name))
        return name

    def node(self, op: str, inputs: list[str], outputs: list[str], domain: str = "", **attrs) -> None:
        self.nodes.append(helper.make_node(op, inputs, outputs, domain=domain or None,
                                           name=f"{outputs[0]}/{op}", **attrs))


Builder = Callable[[CompressedLayer, str, str], Replacement]


def conv_attrs(layer: CompressedLayer) -> dict:
    """ONNX Conv attributes of a compressed conv layer (symmetric padding, as PyTorch's)."""
    c = layer.conv
    return {"kernel_shape": list(c["kernel_size"]), "strides": list(c["stride"]),
            "pads": list(c["padding"]) * 2, "dilations": list(c["dilation"]), "group": int(c["groups"])}


def rewrite(proto: onnx.ModelProto, cm: CompressedModel, build: Builder, domains: dict[str, int],
            graph_pass: Callable[[onnx.ModelProto], None] | None = None) -> tuple[onnx.ModelProto, dict]:
    """A copy of `proto` with each marker replaced by build(), then graph_pass (in place) if
    given; returns (model, per-layer info)."""
    out = onnx.ModelProto()
    out.CopyFrom(proto)
    nodes, infos = [], {}
    for node in out.graph.node:
        if node.domain != CAPTURE_DOMAIN:
            nodes.append(node)
            continue
        name = next(a.s.decode() for a in node.attribute if a.name == "name")
        rep = build(cm.layers[name], node.input[0], node.output[0])
        nodes.extend(rep.nodes)
        out.graph.initializer.extend(rep.initializers)
        infos[name] = rep.info
    del out.graph.node[:]
    out.graph.node.extend(nodes)
    if graph_pass is not None:
        graph_pass(out)
    finish(out, domains)
    return out, infos


def finish(model: onnx.ModelProto, domains: dict[str, int]) -> None:
    """Set the opset imports (default domain GRAPH_OPSET + the flavour's domains), IR version,
    and check the model; raises SpfqError if onnx.checker rejects it."""
    del model.opset_import[:]
    model.opset_import.extend([helper.make_opsetid("", GRAPH_OPSET)] +
                              [helper.make_opsetid(d, v) for d, v in sorted(domains.items())])
    model.ir_version = IR_VERSION
    model.producer_name = "spfq-deploy"
    try:
        onnx.checker.check_model(model)
    except onnx.checker.ValidationError as exc:
        raise SpfqError(f"the exported graph fails onnx.checker: {str(exc).splitlines()[0]}") from None


def float_graph(model, inputs: ExportInputs) -> onnx.ModelProto:
    """The uncompressed model as plain ONNX (the fp32 baseline benchmarks compare against)."""
    proto = capture(model, CompressedModel(layers={}, float_params={}), inputs)
    finish(proto, {})
    return proto
