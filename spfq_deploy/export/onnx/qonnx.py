"""The QONNX flavour (model.qonnx.onnx): float weights on the quantization grid behind QONNX
Quant / BipolarQuant nodes (domain qonnx.custom_op.general), as FINN and hls4ml read them.

Quant(x, scale, zeropt=0, bitwidth=b, signed, narrow) returns clamp(round(x / scale)) * scale,
so the weight it sees is the dequantized one and its integer grid is explicit: b-bit narrow
range for int codes (levels -K..K), 2-bit narrow for ternary, BipolarQuant for binary. A pruned
layer's weight is the sum of two such terms (scale * c + (lam - scale) * sign(c)).
Group-wise scales (--group-size): the scale input holds one value per weight element (the
group's scale repeated over its columns), which Quant broadcasts as any scale.
"""

from __future__ import annotations

import numpy as np

from ...compressed import CompressedLayer
from .graph import Builder, Replacement, conv_attrs

DOMAIN = "qonnx.custom_op.general"
DOMAIN_VERSION = 1


def _quant(rep: Replacement, name: str, layer: CompressedLayer, codes: np.ndarray, scale: np.ndarray,
           bits: int) -> str:
    """A Quant'd weight term in the layout the layer's float op wants: (K, N) for MatMul,
    (N, C/g, *k) for Conv; scale broadcast along the output channel (group-wise: one per element)."""
    scale = scale.astype(np.float32)
    safe = np.where(scale == 0, np.float32(1), scale)  # a zero-scale row has all-zero codes
    if layer.group_size:
        safe = layer.column_scales(safe)  # (N, K)
        w = codes.astype(np.float32) * layer.column_scales(scale)
        x = rep.const(f"{name}.float", w.T if layer.kind == "linear" else w.reshape(layer.weight_shape))
        sc = rep.const(f"{name}.scale", np.ascontiguousarray(safe.T) if layer.kind == "linear"
                       else safe.reshape(layer.weight_shape))
        return _node(rep, name, x, sc, bits)
    w = codes.astype(np.float32) * scale[:, None]
    if layer.kind == "linear":
        w, s = w.T, safe[None, :]
    else:
        w, s = w.reshape(layer.weight_shape), safe.reshape((-1,) + (1,) * (len(layer.weight_shape) - 1))
    x = rep.const(f"{name}.float", w)
    sc = rep.const(f"{name}.scale", s)
    return _node(rep, name, x, sc, bits)


def _node(rep: Replacement, name: str, x: str, sc: str, bits: int) -> str:
    if bits == 1:
        rep.node("BipolarQuant", [x, sc], [f"{name}.w"], domain=DOMAIN)
    else:
        zero = rep.const(f"{name}.zeropt", np.zeros((), np.float32))
        width = rep.const(f"{name}.bitwidth", np.array(bits, np.float32))
        rep.node("Quant", [x, sc, zero, width], [f"{name}.w"], domain=DOMAIN, signed=1, narrow=1,
                 rounding_mode="ROUND")
    return f"{name}.w"


def builder() -> Builder:
    def build(layer: CompressedLayer, x: str, y: str) -> Replacement:
        rep = Replacement()
        p = layer.name
        # BipolarQuant has no 0: pruned codes, and rows whose scale is 0 (their weight is 0), need Quant
        pruned_binary = layer.alphabet == "binary" and bool(np.any(layer.codes == 0) or np.any(layer.scale == 0))
        bits = 1 if layer.alphabet == "binary" and not pruned_binary else (2 if layer.K == 1 else layer.bits)
        ws = [_quant(rep, p, layer, layer.codes, layer.scale, bits)]
        if layer.K > 1 and layer.lam is not None:
            extra = layer.lam.astype(np.float32) - layer.scale.astype(np.float32)
            ws.append(_quant(rep, f"{p}.lam", layer, np.sign(layer.codes), extra, 2))
        terms = len(ws)
        if terms == 2:
            rep.node("Add", ws, [f"{p}.wsum"])
            ws = [f"{p}.wsum"]
        bias = rep.const(f"{p}.bias", np.asarray(layer.bias, np.float32)) if layer.bias is not None else None
        if layer.kind == "linear":
            if bias:
                rep.node("MatMul", [x, ws[0]], [f"{p}.mm"])
                rep.node("Add", [f"{p}.mm", bias], [y])
            else:
                rep.node("MatMul", [x, ws[0]], [y])
        else:
            rep.node("Conv", [x, ws[0]] + ([bias] if bias else []), [y], **conv_attrs(layer))
        rep.info = {"op": ("BipolarQuant" if bits == 1 else "Quant") + f"(bitwidth {bits})", "terms": terms}
        return rep

    return build
