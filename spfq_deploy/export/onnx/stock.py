"""The stock flavour (model.stock.onnx): standard ONNX only, runs in any ONNX Runtime.

Weights are int4 (binary, ternary, 2..4-bit codes) or int8 (5..8-bit) initializers behind
DequantizeLinear: per-block scales along K for Linear layers (onnxruntime fuses
DequantizeLinear + MatMul into com.microsoft.MatMulNBits; its compute precision is the session
option session.qdq_matmulnbits_accuracy_level, 0 = float, 4 = int8), per-channel for convs.
A pruned layer's alphabet {0} U +-{lam, lam + delta, ...} is not a uniform grid, so its weight
is split exactly as value = scale * c + (lam - scale) * sign(c): two quantized terms.
Group-wise scales (--group-size G): the scales are the DequantizeLinear blocks themselves,
block_size = G along K (ONNX takes a shorter last block), so a Linear layer is again the
pattern ORT fuses into MatMulNBits (block_size G); a conv's weight is dequantized as (N, K) with
blocks along K, then reshaped to (N, C/g, *k).
"""

from __future__ import annotations

import numpy as np
from onnx import TensorProto, helper

from ...compressed import CompressedLayer
from .graph import Builder, Replacement, conv_attrs


def _int_tensor(name: str, codes: np.ndarray) -> tuple:
    """int4 (two codes per byte, low nibble first) when codes fit in [-7, 7], else int8."""
    codes = np.ascontiguousarray(codes, dtype=np.int8)
    if np.abs(codes).max(initial=0) <= 7:
        flat = (codes.reshape(-1).astype(np.uint8) & 0x0F)
        if flat.size % 2:
            flat = np.append(flat, np.uint8(0))
        raw = (flat[0::2] | (flat[1::2] << 4)).tobytes()
        return helper.make_tensor(name, TensorProto.INT4, codes.shape, raw, raw=True), 4
    return helper.make_tensor(name, TensorProto.INT8, codes.shape, codes.tobytes(), raw=True), 8


def _block(k: int) -> int | None:
    for b in (64, 32, 16):
        if k % b == 0:
            return b
    return None


def _dequantized_linear(rep: Replacement, name: str, codes: np.ndarray, scale: np.ndarray, group: int = 0) -> str:
    """DequantizeLinear of codes (N, K) as a (K, N) weight, scale per output column (or, with
    groups, per output column and block of `group` rows of K: scale (N, ceil(K / group)))."""
    wt, bits = _int_tensor(f"{name}.q", codes.T)
    rep.initializers.append(wt)
    k = codes.shape[1]
    bs = group or _block(k)
    if group:
        s = rep.const(f"{name}.s", np.ascontiguousarray(scale.astype(np.float32).T))
        rep.node("DequantizeLinear", [wt.name, s], [f"{name}.w"], axis=0, block_size=group)
    elif bs:  # blocked along K: the pattern onnxruntime fuses into MatMulNBits
        s = rep.const(f"{name}.s", np.tile(scale.astype(np.float32), (k // bs, 1)))
        rep.node("DequantizeLinear", [wt.name, s], [f"{name}.w"], axis=0, block_size=bs)
    else:
        s = rep.const(f"{name}.s", scale.astype(np.float32))
        rep.node("DequantizeLinear", [wt.name, s], [f"{name}.w"], axis=1)
    rep.info.setdefault("weight_bits", bits)
    rep.info.setdefault("block_size", bs or 0)
    return f"{name}.w"


def _dequantized_conv(rep: Replacement, name: str, layer: CompressedLayer, codes: np.ndarray,
                      scale: np.ndarray) -> str:
    if layer.group_size:  # blocks along the flattened K, then the conv weight's shape
        wt, bits = _int_tensor(f"{name}.q", codes)
        rep.initializers.append(wt)
        s = rep.const(f"{name}.s", scale.astype(np.float32))
        rep.node("DequantizeLinear", [wt.name, s], [f"{name}.w2"], axis=1, block_size=layer.group_size)
        shape = rep.const(f"{name}.shape", np.asarray(layer.weight_shape, np.int64))
        rep.node("Reshape", [f"{name}.w2", shape], [f"{name}.w"])
        rep.info.setdefault("weight_bits", bits)
        rep.info.setdefault("block_size", layer.group_size)
        return f"{name}.w"
    wt, bits = _int_tensor(f"{name}.q", codes.reshape(layer.weight_shape))
    rep.initializers.append(wt)
    s = rep.const(f"{name}.s", scale.astype(np.float32))
    rep.node("DequantizeLinear", [wt.name, s], [f"{name}.w"], axis=0)
    rep.info.setdefault("weight_bits", bits)
    return f"{name}.w"


def builder() -> Builder:
    def build(layer: CompressedLayer, x: str, y: str) -> Replacement:
        rep = Replacement()
        p = layer.name
        terms = [(p, layer.codes, layer.scale)]
        if layer.K > 1 and layer.lam is not None:
            extra = (layer.lam.astype(np.float32) - layer.scale.astype(np.float32))
            terms.append((f"{p}.lam", np.sign(layer.codes).astype(np.int8), extra))
        bias = rep.const(f"{p}.bias", np.asarray(layer.bias, np.float32)) if layer.bias is not None else None
        if layer.kind == "linear":
            outs = []
            for i, (name, codes, scale) in enumerate(terms):
                w = _dequantized_linear(rep, name, codes, scale, layer.group_size)
                outs.append(f"{p}.mm{i}")
                rep.node("MatMul", [x, w], [outs[-1]])
            if len(outs) == 2:
                rep.node("Add", outs, [f"{p}.mm"])
                outs = [f"{p}.mm"]
            rep.node("Add", [outs[0], bias], [y]) if bias else rep.node("Identity", outs, [y])
        else:
            ws = [_dequantized_conv(rep, name, layer, codes, scale) for name, codes, scale in terms]
            if len(ws) == 2:
                rep.node("Add", ws, [f"{p}.wsum"])
                ws = [f"{p}.wsum"]
            rep.node("Conv", [x, ws[0]] + ([bias] if bias else []), [y], **conv_attrs(layer))
        rep.info.update(op="DequantizeLinear+" + ("MatMul" if layer.kind == "linear" else "Conv"),
                        terms=len(terms))
        return rep

    return build
