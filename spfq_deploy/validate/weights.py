"""Weight-level check of the ONNX flavours: every weight initializer decoded back to integer
codes, scales, lam and bias, compared EXACTLY with what OUT/model.spfq holds.

Why: the numeric checks run the artifact on the few samples of inputs.npz; a damaged weight that
those samples do not touch (a ReLU that stays off, a padded position) passes them. Each layer's
weights are therefore decoded here and compared with the compressed layer bit for bit.

The decoders are independent re-implementations of the formats from their documentation (the
manifest's "bit_packing" text, kernels/include/spfq_kernels.h, kernels/ort/spfq_ort_ops.cc, the
README and the export builders' docstrings), in numpy only: nothing here calls the exporters'
packers or spfq_deploy.pack, so an exporter bug is not hidden by the same code decoding it.

custom (model.spfq.onnx, domain ai.spfq): each PackedMatMul / PackedConv node reads
    (X, sign?, mask?, planes?, scale, lam?, bias?), attributes layout, bits, in_features (K),
    out_features (N), kept_words. Words are uint64 along K, bit j of a row in bit j%64 of word
    j//64, rows zero-padded to W = ceil(K/64) words.
    layout 1 SIGN       sign (N,W), bit 1 = code -1, else +1
    layout 2 SIGN_MASK  sign + mask (N,W): code = mask ? (sign ? -1 : +1) : 0 (no sign bit on a zero)
    layout 3 PLANES     planes (b,N,W): plane p = bit p of u = c + 2^(b-1); u = 0 never encodes a weight
    layout 4 SPARSE     mask (N,W) + kept (b,N,Wk): per row the nonzero codes in column order as
                        fields (c<0) | ((|c|-1) << 1), bit planes, unused fields zero
    value(c) = sign(c) * (lam[n] + (|c|-1) * scale[n]), lam = scale when absent; SIGN and
    SIGN_MASK ignore lam (spfq_kernels.h).
stock (model.stock.onnx): per layer DequantizeLinear of `<layer>.q` (INT4: two's complement,
    two per byte, low nibble first; or INT8) with scale `<layer>.s` (per output channel, or
    blocked along K: block_size, axis 0), optional zero point; Linear weights transposed (K, N),
    conv weights in PyTorch shape. A pruned multi-level layer has a second term `<layer>.lam.q`
    = sign(c) with scale lam - scale (the weight is scale*c + (lam - scale)*sign(c)).
qonnx (model.qonnx.onnx): per layer Quant(`<layer>.float`, scale, zeropt, bitwidth; signed,
    narrow, rounding_mode) or BipolarQuant(x, scale); the weight the graph sees is the node's
    output, n * scale with n the clamped, rounded x / scale + zeropt (minus zeropt), and that n and
    scale are compared; same second term `<layer>.lam.float` for pruned multi-level layers.
Biases (`<layer>.bias`, the custom node's bias input) must equal model.spfq's as float32.
Every layer of model.spfq must be present in each flavour; a missing layer is a mismatch too.
"""

from __future__ import annotations

import numpy as np
import onnx
from onnx import TensorProto, numpy_helper

CUSTOM_DOMAIN = "ai.spfq"
CUSTOM_OPS = ("PackedMatMul", "PackedConv")
WEIGHTLESS_OPS = ("MaxPool",)  # ai.spfq ops that carry no weights (the channels-last pooling)
QONNX_DOMAIN = "qonnx.custom_op.general"
SIGN, SIGN_MASK, PLANES, SPARSE = 1, 2, 3, 4
LAYOUT_NAMES = {SIGN: "sign", SIGN_MASK: "sign_mask", PLANES: "planes", SPARSE: "sparse"}
MAX_REPORTED = 20  # mismatch lines kept per artifact (the first one is what the row names)


class Mismatch(Exception):
    """A weight of the artifact that is not what model.spfq holds (or cannot be decoded)."""


# ---------------------------------------------------------------- tensors

def _tensor(inits: dict, name: str, what: str) -> np.ndarray:
    if name not in inits:
        raise Mismatch(f"{what} {name!r} is not an initializer")
    t = inits[name]
    if t.data_location == TensorProto.EXTERNAL:
        raise Mismatch(f"{what} {name!r} is stored as external data (not read by this check)")
    if t.data_type in (TensorProto.INT4, TensorProto.UINT4):
        return _int4(t)
    try:
        return numpy_helper.to_array(t)
    except Exception as exc:  # a damaged tensor proto
        raise Mismatch(f"{what} {name!r} cannot be read ({str(exc).splitlines()[0] if str(exc) else type(exc).__name__})") from None


def _int4(t: onnx.TensorProto) -> np.ndarray:
    """INT4 / UINT4: two values per byte, element 2i in the low nibble, 2i+1 in the high one;
    INT4 is two's complement. raw_data, or int32_data holding one such byte per entry."""
    dims = tuple(int(d) for d in t.dims)
    count = int(np.prod(dims, dtype=np.int64))
    if t.raw_data:
        packed = np.frombuffer(t.raw_data, dtype=np.uint8)
    else:
        packed = np.asarray(t.int32_data, dtype=np.int64).astype(np.uint8)
    if packed.size != (count + 1) // 2:
        raise Mismatch(f"int4 tensor {t.name!r} holds {packed.size} bytes, {dims} needs {(count + 1) // 2}")
    nib = np.empty(packed.size * 2, dtype=np.int16)
    nib[0::2] = packed & 0x0F
    nib[1::2] = packed >> 4
    nib = nib[:count]
    if t.data_type == TensorProto.INT4:
        nib = np.where(nib >= 8, nib - 16, nib)
    return nib.reshape(dims)


def _bits(words: np.ndarray) -> np.ndarray:
    """uint64 words (..., W) -> 0/1 uint8 (..., W*64): bit j of a row = bit j%64 of word j//64."""
    w = np.ascontiguousarray(words, dtype="<u8")  # value bit i of a word = bit i%8 of its little-endian byte i//8
    if w.shape[-1] == 0:
        return np.zeros(w.shape[:-1] + (0,), np.uint8)
    return np.unpackbits(w.view(np.uint8), axis=-1, bitorder="little")


def _words_input(inits, name, shape, what) -> np.ndarray:
    a = _tensor(inits, name, what)
    if a.dtype != np.uint64:
        raise Mismatch(f"{what} is {a.dtype}, the kernel ABI takes uint64 words")
    if tuple(a.shape) != tuple(shape):
        raise Mismatch(f"{what} has shape {tuple(a.shape)}, expected {tuple(shape)}")
    return a


def _plain_bits(inits, name, n, k, what) -> np.ndarray:
    """A (N, W) bit buffer as 0/1 (N, K), its padding checked."""
    W = -(-k // 64)
    b = _bits(_words_input(inits, name, (n, W), what))
    if b[:, k:].any():
        raise Mismatch(f"{what}: nonzero padding bits past column {k}")
    return b[:, :k]


# ---------------------------------------------------------------- comparisons

def _codes_equal(got: np.ndarray, want: np.ndarray, what: str) -> None:
    got, want = np.asarray(got).astype(np.int16), np.asarray(want).astype(np.int16)
    if got.shape != want.shape:
        raise Mismatch(f"{what}: shape {got.shape}, model.spfq has {want.shape}")
    bad = np.argwhere(got != want)
    if bad.size:
        r, c = (int(v) for v in bad[0])
        raise Mismatch(f"{what}: code of weight (row {r}, column {c}) is {int(got[r, c])}, model.spfq has "
                       f"{int(want[r, c])} ({len(bad)} weight{'s' if len(bad) > 1 else ''} differ)")


def _floats_equal(got, want, what: str) -> None:
    got = np.ascontiguousarray(got, dtype=np.float32)
    want = np.ascontiguousarray(want, dtype=np.float32)
    if got.shape != want.shape:
        raise Mismatch(f"{what}: shape {got.shape}, model.spfq has {want.shape}")
    same = (got.view(np.uint32) == want.view(np.uint32)) | (got == want)  # bit-exact (or +0 == -0)
    bad = np.argwhere(~same)
    if bad.size:
        i = tuple(int(v) for v in bad[0])
        raise Mismatch(f"{what}: element {i if len(i) > 1 else i[0]} is {float(got[i]):.9g}, model.spfq has "
                       f"{float(want[i]):.9g} ({len(bad)} differ)")


def _f32(a) -> np.ndarray:
    return np.asarray(a, dtype=np.float32)


def _bias(inits: dict, name: str | None, layer) -> None:
    have = bool(name) and name in inits
    if layer.bias is None:
        if have:
            raise Mismatch(f"bias {name!r} present, model.spfq has no bias for this layer")
        return
    if not have:
        raise Mismatch("bias missing (model.spfq has one)")
    got = _tensor(inits, name, "bias")
    if got.dtype != np.float32:
        raise Mismatch(f"bias is {got.dtype}, expected float32")
    _floats_equal(got.reshape(-1), _f32(layer.bias).reshape(-1), "bias")


# ---------------------------------------------------------------- custom (ai.spfq)

def _attrs(node) -> dict:
    out = {}
    for a in node.attribute:
        v = onnx.helper.get_attribute_value(a)
        out[a.name] = v.decode("utf-8", "replace") if isinstance(v, bytes) else v
    return out


def decode_custom(node, inits: dict) -> tuple[np.ndarray, dict]:
    """(codes (N, K) int16, {"layout", "bits", "scale", "lam", "bias name"}) of one ai.spfq node."""
    a = _attrs(node)
    inp = list(node.input) + [""] * (7 - len(node.input))
    layout, b = int(a.get("layout", 0)), int(a.get("bits", 0))
    n, k = int(a.get("out_features", -1)), int(a.get("in_features", -1))
    if layout not in LAYOUT_NAMES:
        raise Mismatch(f"unknown layout id {layout}")
    if n < 0 or k < 0:
        raise Mismatch("node lacks in_features / out_features")
    need = {SIGN: (1,), SIGN_MASK: (1, 2), PLANES: (3,), SPARSE: (2, 3)}[layout]
    for i in need:
        if not inp[i]:
            raise Mismatch(f"layout {LAYOUT_NAMES[layout]} needs the {('', 'sign', 'mask', 'planes')[i]} input")
    if layout == SIGN:
        codes = 1 - 2 * _plain_bits(inits, inp[1], n, k, "sign").astype(np.int16)
    elif layout == SIGN_MASK:
        neg = _plain_bits(inits, inp[1], n, k, "sign").astype(bool)
        nz = _plain_bits(inits, inp[2], n, k, "mask").astype(bool)
        if np.any(neg & ~nz):
            r, c = (int(v) for v in np.argwhere(neg & ~nz)[0])
            raise Mismatch(f"sign bit set on a masked-out (zero) weight (row {r}, column {c})")
        codes = np.where(nz, np.where(neg, -1, 1), 0).astype(np.int16)
    elif layout == PLANES:
        if not 2 <= b <= 8:
            raise Mismatch(f"planes layout with bits = {b} (2..8)")
        W = -(-k // 64)
        planes = _bits(_words_input(inits, inp[3], (b, n, W), "planes"))  # (b, N, W*64)
        if planes[:, :, k:].any():
            raise Mismatch(f"planes: nonzero padding bits past column {k}")
        u = (planes[:, :, :k].astype(np.int16) << np.arange(b, dtype=np.int16)[:, None, None]).sum(axis=0)
        if np.any(u == 0):
            r, c = (int(v) for v in np.argwhere(u == 0)[0])
            raise Mismatch(f"planes: field u = 0 at (row {r}, column {c}) encodes no weight")
        codes = u - (1 << (b - 1))
    else:  # SPARSE
        if not 2 <= b <= 8:
            raise Mismatch(f"sparse layout with bits = {b} (2..8)")
        wk = int(a.get("kept_words", -1))
        if wk < 0:
            raise Mismatch("sparse node lacks kept_words")
        nz = _plain_bits(inits, inp[2], n, k, "mask").astype(bool)
        kept = _bits(_words_input(inits, inp[3], (b, n, wk), "kept planes"))  # (b, N, Wk*64)
        fields = (kept.astype(np.int16) << np.arange(b, dtype=np.int16)[:, None, None]).sum(axis=0)
        nnz = nz.sum(axis=1)
        if nnz.size and int(nnz.max()) > wk * 64:
            raise Mismatch(f"sparse: a row has {int(nnz.max())} nonzero weights, kept_words {wk} hold {wk * 64}")
        used = np.arange(wk * 64)[None, :] < nnz[:, None]
        if np.any(fields[~used]):
            raise Mismatch("sparse: nonzero bits in unused kept fields (padding)")
        mag = (fields >> 1) + 1
        if np.any(mag[used] > (1 << (b - 1)) - 1):
            raise Mismatch(f"sparse: a kept field lies outside the {b}-bit range")
        vals = np.where(fields & 1, -mag, mag)
        codes = np.zeros((n, k), np.int16)
        rows, cols = np.nonzero(nz)  # row-major: column order within a row
        rank = np.cumsum(nz, axis=1)[rows, cols] - 1
        codes[rows, cols] = vals[rows, rank]
    if not inp[4]:
        raise Mismatch("scale input missing")
    scale = _tensor(inits, inp[4], "scale")
    lam = _tensor(inits, inp[5], "lam") if inp[5] else None
    group = int(a.get("group_size", 0))
    want = (n, -(-k // group)) if group > 0 else (n,)
    for what, v in (("scale", scale), ("lam", lam)):
        if v is not None and (v.dtype != np.float32 or v.shape != want):
            raise Mismatch(f"{what} is {v.dtype} {v.shape}, the op takes float32 {want}")
    return codes, {"layout": layout, "bits": b, "scale": scale, "lam": lam, "bias": inp[6] or None}


def _check_custom_layer(node, inits, layer) -> None:
    a = _attrs(node)
    if int(a.get("out_features", -1)) != layer.rows or int(a.get("in_features", -1)) != layer.cols:
        raise Mismatch(f"out_features x in_features {a.get('out_features')} x {a.get('in_features')}, "
                       f"model.spfq has {layer.rows} x {layer.cols}")
    if node.op_type == "PackedConv" and list(a.get("kernel_shape", [])) != list(layer.weight_shape[2:]):
        raise Mismatch(f"kernel_shape {list(a.get('kernel_shape', []))}, model.spfq has {list(layer.weight_shape[2:])}")
    if (node.op_type == "PackedConv") != (layer.kind != "linear"):
        raise Mismatch(f"{node.op_type} for a {layer.kind} layer")
    if int(a.get("group_size", 0)) != layer.group_size:
        raise Mismatch(f"group_size {int(a.get('group_size', 0))}, model.spfq has {layer.group_size}")
    codes, d = decode_custom(node, inits)
    _codes_equal(codes, layer.codes, f"{LAYOUT_NAMES[d['layout']]} words")
    _floats_equal(d["scale"], _f32(layer.scale), "scale")
    # value = sign(c) * (lam + (|c| - 1) * scale), lam = scale when absent or ignored by the layout
    got_lam = d["lam"] if d["lam"] is not None and d["layout"] in (PLANES, SPARSE) else d["scale"]
    want_lam = layer.lam if layer.lam is not None else layer.scale
    if layer.K > 1:  # for binary / ternary codes |c| = 1: the level is scale, lam plays no part
        _floats_equal(got_lam, _f32(want_lam), "lam")
    _bias(inits, d["bias"], layer)


def _check_custom(model, inits, cm) -> tuple[dict, list]:
    """({layer: [nodes]}, [(None, why)] for ai.spfq nodes of no layer) of the custom-op flavour."""
    found, extra = {}, []
    for node in model.graph.node:
        if node.domain != CUSTOM_DOMAIN or node.op_type in WEIGHTLESS_OPS:
            continue
        if node.op_type not in CUSTOM_OPS:
            extra.append((None, f"node {node.name or '?'}: unknown {CUSTOM_DOMAIN} op {node.op_type}"))
            continue
        scale = node.input[4] if len(node.input) > 4 else ""
        name = scale[: -len(".scale")] if scale.endswith(".scale") else None
        if name not in cm.layers:
            why = f"node {node.name or '?'}: {node.op_type} whose weights ({scale or 'no scale'}) belong to no layer"
            extra.append((None, why + " of model.spfq"))
            continue
        found.setdefault(name, []).append(node)
    return found, extra


# ---------------------------------------------------------------- stock (DequantizeLinear)

def _dequant_parts(node, inits, what) -> tuple[np.ndarray, np.ndarray]:
    """(integer values minus zero point, per-element scale) of a DequantizeLinear node, both in
    the quantized tensor's shape."""
    q = _tensor(inits, node.input[0], what)
    if not np.issubdtype(q.dtype, np.integer):
        raise Mismatch(f"{what} {node.input[0]!r} is {q.dtype}, not an integer tensor")
    q = q.astype(np.int32)
    a = _attrs(node)
    axis, block = int(a.get("axis", 1)), int(a.get("block_size", 0))

    def spread(v, name):
        v = np.asarray(v)
        if v.size == 1 and v.ndim <= 1:
            return np.broadcast_to(v.reshape(()), q.shape)
        ax = axis % q.ndim if q.ndim else 0
        if block > 0:
            want = list(q.shape)
            want[ax] = -(-q.shape[ax] // block)
            if list(v.shape) != want:
                raise Mismatch(f"{name} has shape {list(v.shape)}, block_size {block} on axis {ax} needs {want}")
            return np.repeat(v, block, axis=ax).take(np.arange(q.shape[ax]), axis=ax)
        if v.ndim != 1 or v.shape[0] != q.shape[ax]:
            raise Mismatch(f"{name} has shape {list(v.shape)}, axis {ax} of {list(q.shape)} needs [{q.shape[ax]}]")
        shape = [1] * q.ndim
        shape[ax] = v.shape[0]
        return np.broadcast_to(v.reshape(shape), q.shape)

    s = _tensor(inits, node.input[1], f"{what} scale")
    if s.dtype != np.float32:
        raise Mismatch(f"{what} scale is {s.dtype}, expected float32")
    s = spread(s, f"{what} scale")
    if len(node.input) > 2 and node.input[2]:
        z = _tensor(inits, node.input[2], f"{what} zero point").astype(np.int32)
        q = q - spread(z, f"{what} zero point")
    return q, s


def _to_rows(a: np.ndarray, layer, what) -> np.ndarray:
    """A weight-shaped term in the layer's (N, d) order: Linear (K, N) transposed, conv as is."""
    want = (layer.cols, layer.rows) if layer.kind == "linear" else tuple(layer.weight_shape)
    if layer.kind != "linear" and layer.group_size and tuple(a.shape) == (layer.rows, layer.cols):
        return a  # a grouped conv's weight is dequantized as (N, K), blocks along K, then reshaped
    if tuple(a.shape) != want:
        raise Mismatch(f"{what} has shape {list(a.shape)}, model.spfq needs {list(want)}")
    return a.T if layer.kind == "linear" else a.reshape(layer.rows, -1)


def _terms(layer) -> list[tuple[str, np.ndarray, np.ndarray]]:
    """(suffix, codes (N, d), scale (N, 1) per row or (N, d) per column of group-wise scales)
    the two-term formats must hold for a layer."""
    terms = [("", layer.codes, layer.column_scales(_f32(layer.scale)))]
    if layer.K > 1 and layer.lam is not None:
        terms.append((".lam", np.sign(layer.codes), layer.column_scales(_f32(layer.lam) - _f32(layer.scale))))
    return terms


def _check_term(codes_got, scale_got, codes_want, scale_want, what, zero_rows_by_value=False) -> None:
    scale_want = np.broadcast_to(scale_want, scale_got.shape)  # (N, 1) or (N, d) -> (N, d)
    if zero_rows_by_value:  # a zero scale is worth 0 whatever its codes: compare values there
        live = scale_want != 0
        _floats_equal(np.where(live, 0, codes_got * scale_got), np.zeros_like(scale_got), f"{what} value")
        codes_got = np.where(live, codes_got, codes_want)
        scale_got = np.where(live, scale_got, scale_want)
    _codes_equal(codes_got, codes_want, f"{what} codes")
    _floats_equal(scale_got, scale_want, f"{what} scale")


def _check_stock_layer(p, layer, nodes, inits) -> None:
    terms = _terms(layer)
    for suffix, codes, scale in terms:
        node = nodes.get(f"{p}{suffix}.q")
        if node is None:
            raise Mismatch(f"no DequantizeLinear of {p}{suffix}.q" +
                           (" (the lam term of a pruned layer)" if suffix else ""))
        q, s = _dequant_parts(node, inits, f"{p}{suffix}.q")
        _check_term(_to_rows(q, layer, f"{p}{suffix}.q"), _to_rows(s, layer, f"{p}{suffix}.s"), codes, scale,
                    f"{p}{suffix}.q")
    if len(terms) == 1 and f"{p}.lam.q" in nodes:
        raise Mismatch(f"a lam term {p}.lam.q, model.spfq has no lam for this layer")
    _bias(inits, f"{p}.bias", layer)


# ---------------------------------------------------------------- qonnx (Quant / BipolarQuant)

def _round(mode: str):
    m = mode.upper()
    return {"ROUND": np.round, "HALF_EVEN": np.round, "CEIL": np.ceil, "FLOOR": np.floor, "DOWN": np.fix,
            "UP": lambda x: np.sign(x) * np.ceil(np.abs(x)),
            "HALF_UP": lambda x: np.sign(x) * np.floor(np.abs(x) + 0.5),
            "HALF_DOWN": lambda x: np.sign(x) * np.ceil(np.abs(x) - 0.5)}.get(m)


def _qonnx_parts(node, inits, what) -> tuple[np.ndarray, np.ndarray]:
    """(integer level n, per-element scale), both in x's shape: the node outputs n * scale."""
    x = _tensor(inits, node.input[0], what)
    s = _tensor(inits, node.input[1], f"{what} scale")
    if x.dtype != np.float32 or s.dtype != np.float32:
        raise Mismatch(f"{what} / its scale are {x.dtype} / {s.dtype}, expected float32")
    try:
        s = np.broadcast_to(s, x.shape)
    except ValueError:
        raise Mismatch(f"{what} scale shape {list(s.shape)} does not broadcast to {list(x.shape)}") from None
    with np.errstate(divide="ignore", invalid="ignore"):
        y = x / s
    if node.op_type == "BipolarQuant":
        return np.where(y >= 0, 1, -1).astype(np.int32), s  # sign(x / scale), +1 at 0
    a = _attrs(node)
    z = _tensor(inits, node.input[2], f"{what} zeropt").astype(np.float32)
    bw = _tensor(inits, node.input[3], f"{what} bitwidth")
    if bw.size != 1:
        raise Mismatch(f"{what} bitwidth has {bw.size} values")
    b = float(bw.reshape(-1)[0])
    if b != int(b) or not 1 <= b <= 32:
        raise Mismatch(f"{what} bitwidth {b:g}")
    b = int(b)
    signed, narrow = int(a.get("signed", 1)), int(a.get("narrow", 0))
    y = y + z
    if b == 1 and signed:
        n = np.where(y >= 0, 1.0, -1.0)
    else:
        lo = (-(2 ** (b - 1)) + narrow) if signed else 0
        hi = (2 ** (b - 1) - 1) if signed else (2 ** b - 1 - narrow)
        rnd = _round(str(a.get("rounding_mode", "ROUND")))
        if rnd is None:
            raise Mismatch(f"{what}: unknown rounding_mode {a.get('rounding_mode')!r}")
        n = rnd(np.clip(y, lo, hi))
    n = n - z
    if not np.all(np.isfinite(n)) or np.any(n != np.round(n)):
        raise Mismatch(f"{what}: levels that are not integers (zeropt {np.unique(z)[:3].tolist()})")
    return n.astype(np.int32), s


def _check_qonnx_layer(p, layer, nodes, inits) -> None:
    terms = _terms(layer)
    for suffix, codes, scale in terms:
        node = nodes.get(f"{p}{suffix}.float")
        if node is None:
            raise Mismatch(f"no Quant / BipolarQuant of {p}{suffix}.float" +
                           (" (the lam term of a pruned layer)" if suffix else ""))
        n, s = _qonnx_parts(node, inits, f"{p}{suffix}.float")
        # the exporter stores scale 1 on a zero-scale row (its weights are 0): compare values there
        _check_term(_to_rows(n, layer, f"{p}{suffix}.float"), _to_rows(s, layer, f"{p}{suffix}.scale"), codes,
                    scale, f"{p}{suffix}.float", zero_rows_by_value=True)
    if len(terms) == 1 and f"{p}.lam.float" in nodes:
        raise Mismatch(f"a lam term {p}.lam.float, model.spfq has no lam for this layer")
    _bias(inits, f"{p}.bias", layer)


# ---------------------------------------------------------------- driver

def _by_weight(model, ops: tuple[str, ...], domain: str | None) -> dict:
    nodes = {}
    for node in model.graph.node:
        if node.op_type in ops and (domain is None or (node.domain or "") == domain) and node.input:
            nodes.setdefault(node.input[0], node)
    return nodes


def check(model: onnx.ModelProto, flavour: str, cm, order: list[str] | None = None) -> dict:
    """The weight check of one ONNX flavour ('custom' | 'stock' | 'qonnx') against cm
    (container.load of model.spfq). Never raises for a damaged model: mismatches are returned.

    {"status": "ok" | "fail", "layers": number of layers of cm, "exact": number found exact,
     "first_mismatch": first layer (graph order) that differs or None, "mismatches": [{"layer" (None for a
     node of no layer), "problem"}] (the first MAX_REPORTED), "mismatch_count"}"""
    names = [n for n in (order or []) if n in cm.layers] + [n for n in cm.layers if n not in (order or [])]
    inits = {i.name: i for i in model.graph.initializer}
    problems: list[tuple[str, str]] = []
    exact = 0
    if flavour == "custom":
        found, extra = _check_custom(model, inits, cm)
        for p in names:
            nodes = found.get(p, [])
            if not nodes:
                problems.append((p, f"no {CUSTOM_DOMAIN} PackedMatMul / PackedConv node in the graph"))
                continue
            try:
                for node in nodes:
                    _check_custom_layer(node, inits, cm.layers[p])
                exact += 1
            except Mismatch as exc:
                problems.append((p, str(exc)))
        problems += extra
    elif flavour in ("stock", "qonnx"):
        if flavour == "stock":
            nodes, fn = _by_weight(model, ("DequantizeLinear",), ""), _check_stock_layer
            suffixes = (".lam.q", ".q")
        else:
            nodes, fn = _by_weight(model, ("Quant", "BipolarQuant"), QONNX_DOMAIN), _check_qonnx_layer
            suffixes = (".lam.float", ".float")
        for p in names:
            try:
                fn(p, cm.layers[p], nodes, inits)
                exact += 1
            except Mismatch as exc:
                problems.append((p, str(exc)))
        for w, node in nodes.items():  # a quantized weight of no layer of model.spfq
            base = next((w[: -len(s)] for s in suffixes if w.endswith(s)), None)
            if base not in cm.layers and w in inits:
                problems.append((None, f"node {node.name or '?'}: {node.op_type} of {w!r}, which is no layer of "
                                       "model.spfq"))
    else:
        raise ValueError(f"no weight check for flavour {flavour!r}")
    first = next((n for n, _ in problems if n), None)
    return {"status": "fail" if problems else "ok", "layers": len(names), "exact": exact,
            "first_mismatch": first,
            "mismatches": [{"layer": n, "problem": why} for n, why in problems[:MAX_REPORTED]],
            "mismatch_count": len(problems)}


def check_file(path, flavour: str, cm, order: list[str] | None = None) -> dict:
    """check() of an ONNX file; a file onnx cannot parse is a failed check naming why."""
    try:
        model = onnx.load(str(path), load_external_data=False)
    except Exception as exc:
        text = str(exc).strip().splitlines()
        return {"status": "fail", "layers": len(cm.layers), "exact": 0, "first_mismatch": None,
                "mismatches": [{"layer": None, "problem": f"cannot be parsed ({text[0][:200] if text else type(exc).__name__})"}],
                "mismatch_count": 1}
    return check(model, flavour, cm, order)
