"""The custom-op flavour (model.spfq.onnx): packed initializers + ai.spfq operators.

Each compressed layer becomes one ai.spfq.PackedMatMul / PackedConv node whose weight inputs
are the kernel-ABI packed buffers (kernels/include/spfq_kernels.h), so the file holds the
weights at ~b bits each and the project's custom-op library runs them with the C kernels.
A layer with group-wise scales (--group-size G) gets the attribute group_size = G and scale /
lam inputs (N, ceil(K / G)) (spfq_grouped_* in the library; its convs run im2col GEMMs and keep
float edges, q8.py).
"""

from __future__ import annotations

import numpy as np

from ...compressed import CompressedLayer
from ...kernels import LAYOUT_IDS, kernel_pack, layer_activation, preferred_layout
from .fuse import fuse_activations
from .graph import Builder, Replacement, conv_attrs
from .layout import channels_last
from .q8 import int8_edges

DOMAIN = "ai.spfq"
DOMAIN_VERSION = 1


def builder(activation: str) -> Builder:
    """activation: 'float' (weight-only kernels) or 'int8' (per-row int8 activations; direct-kernel
    layers weight-only, kernels.layer_activation)."""

    def build(layer: CompressedLayer, x: str, y: str) -> Replacement:
        rep = Replacement()
        act = layer_activation(layer, activation)
        layout, bits, bufs = kernel_pack(layer, preferred_layout(layer), groups_ok=True)
        p = layer.name
        inputs = [x]
        for role, key in (("sign", "sign"), ("mask", "mask"), ("planes", "kept" if layout == "sparse" else "planes")):
            inputs.append(rep.const(f"{p}.{role}", bufs[key].astype(np.uint64)) if key in bufs else "")
        inputs.append(rep.const(f"{p}.scale", layer.scale.astype(np.float32)))
        use_lam = layer.lam is not None and layout in ("planes", "sparse")
        inputs.append(rep.const(f"{p}.lam", layer.lam.astype(np.float32)) if use_lam else "")
        inputs.append(rep.const(f"{p}.bias", np.asarray(layer.bias, np.float32)) if layer.bias is not None else "")
        while inputs[-1] == "":
            inputs.pop()
        attrs = dict(layout=LAYOUT_IDS[layout], bits=bits, in_features=layer.cols, out_features=layer.rows,
                     kept_words=int(bufs["kept"].shape[2]) if layout == "sparse" else 0, activation=act)
        if layer.group_size:
            attrs["group_size"] = layer.group_size
        op = "PackedMatMul"
        if layer.kind != "linear":
            op = "PackedConv"
            attrs.update(conv_attrs(layer))
        rep.node(op, inputs, [y], domain=DOMAIN, **attrs)
        rep.info = {"op": f"{DOMAIN}.{op}", "layout": layout, "bits": bits, "activation": act,
                    "packed_bytes": int(sum(b.nbytes for b in bufs.values()))}
        return rep

    return build


def graph_pass(model) -> None:
    """ReLU / Clip after a packed layer fused into it (fuse.py), then activations stay NHWC
    between the PackedConv nodes (layout.py), then int8 between those whose rows are pixels
    (q8.py)."""
    fuse_activations(model, ("PackedConv", "PackedMatMul"), DOMAIN)
    channels_last(model, "PackedConv", DOMAIN)
    int8_edges(model, DOMAIN)
