"""The custom-op flavour (model.spfq.onnx): packed initializers + ai.spfq operators.

Each compressed layer becomes one ai.spfq.PackedMatMul / PackedConv node whose weight inputs
are the kernel-ABI packed buffers (kernels/include/spfq_kernels.h), so the file holds the
weights at ~b bits each and the project's custom-op library runs them with the C kernels.
"""

from __future__ import annotations

import numpy as np

from ..compressed import CompressedLayer
from ..pack import layouts as L
from .onnx_graph import Builder, Replacement, conv_attrs

DOMAIN = "ai.spfq"
DOMAIN_VERSION = 1
LAYOUT_IDS = {"sign": 1, "sign_mask": 2, "planes": 3, "sparse": 4}
# int codes go to the dense bit-plane kernel (which also handles lam) unless at least this
# fraction of the weights is zero: the sparse kernel is slower than the dense one below that
# (benchmarks/results/kernels.json: 4-bit 50% sparse is 3.5x slower than dense planes).
SPARSE_MIN = 0.9


def kernel_layout(layer: CompressedLayer) -> str:
    """The kernel layout a layer is exported in."""
    if layer.alphabet in ("binary", "ternary"):
        return L.default_layout(layer)
    return "sparse" if layer.lam is not None and layer.sparsity >= SPARSE_MIN else "planes"


def builder(activation: str) -> Builder:
    """activation: 'float' (weight-only kernels) or 'int8' (per-row int8 activations)."""

    def build(layer: CompressedLayer, x: str, y: str) -> Replacement:
        rep = Replacement()
        layout = kernel_layout(layer)
        bufs = L.pack_layer(layer, layout)
        bits = L.field_bits(layer) if layout in ("planes", "sparse") else (1 if layout == "sign" else 2)
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
                     kept_words=int(bufs["kept"].shape[2]) if layout == "sparse" else 0, activation=activation)
        op = "PackedMatMul"
        if layer.kind != "linear":
            op = "PackedConv"
            attrs.update(conv_attrs(layer))
        rep.node(op, inputs, [y], domain=DOMAIN, **attrs)
        rep.info = {"op": f"{DOMAIN}.{op}", "layout": layout, "bits": bits, "activation": activation,
                    "packed_bytes": int(sum(b.nbytes for b in bufs.values()))}
        return rep

    return build
