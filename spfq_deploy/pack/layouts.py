"""Packed layouts: one registry entry per format (pack / unpack / storage), ggml type-traits style.

Adding a format = adding one `Layout` to LAYOUTS; the container and every exporter look layouts
up by the name written in the file, so a runtime never guesses how bytes are laid out.
Bit order is the one of `bits.py` (64-bit little-endian words, LSB first, zero padding).

Layouts (codes are the signed level indices k of a CompressedLayer, shape (N, d)):
- "sign":      {"sign": (N,W)}. Codes in {-1,+1}; bit = 1 where k == -1 (the IEEE sign bit).
- "sign_mask": {"sign": (N,W), "mask": (N,W)}. Codes in {-1,0,+1}; mask = (k != 0),
               sign = (k < 0). Ternary layers and pruned binary layers.
- "planes":    {"planes": (b,N,W)}. Offset codes u = k + 2^(b-1) in [1, 2^b-1] as bit planes;
               padding fields are all-zero bits (u = 0 never encodes a weight).
- "offset":    {"codes": uint8 (N, W*8*b)}, b in {2,4,8}. Same u, 8/b fields per byte, field i
               in bits [i*b, (i+1)*b); rows padded to 64 weights with u = 2^(b-1) (k = 0), so
               a nibble/byte kernel (or MatMulNBits with zero point 2^(b-1)) needs no special case.
- "sparse":    {"mask": (N,W), "kept": (b,N,Wk)}. Mask as in sign_mask; the nonzero codes of a
               row in column order form a compact sequence of fields
               c = (k < 0) | ((|k| - 1) << 1), packed as bit planes; rows zero-padded to Wk*64,
               Wk = ceil(max nonzeros per row / 64) (0 for an all-zero layer). The container
               also stores the per-row nonzero counts in the layer table ("row_nnz"): a zero
               padding field reads as the valid code +1, so without them a mask bit set too
               many would go unnoticed.
- "sign_rows", "sign_mask_rows", "planes_rows": the same codes and bits as "sign", "sign_mask"
               and "planes" (their padded twins), but with the rows back to back and no padding
               per row: each role is one row stream (bits.py) of all N*d fields in row-major
               order, bit i = r*d + j for row r, column j, in bit (i % 64) of word (i // 64),
               zero-padded only at the end to a whole word. S = ceil(N*d / 64):
               {"sign": (S,)}, {"sign": (S,), "mask": (S,)}, {"planes": (b,S)} (plane p = bit p
               of u). For rows shorter than a word (depthwise 3x3 convs, d = 9) the padded twins
               spend 64 bits per row and plane on 9 weights. The kernels read the padded twins:
               `padded` turns these buffers into the twin's (the C side repacks anyway), and
               files that use them are format version 2 (`Layout.since`).
The field width b is layer.bits for the int alphabet and 2 for binary/ternary.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any, Callable, Mapping

import numpy as np

from ..compressed import CompressedLayer
from . import bits as B

Buffers = dict[str, np.ndarray]


@dataclass(frozen=True)
class Bits:
    """Bit counts of a layer's packed buffers; *_pad is the share of each that is padding."""

    code: int
    code_pad: int
    mask: int = 0
    mask_pad: int = 0


@dataclass(frozen=True)
class Layout:
    """How one packed format is written and read; `roles` are the buffer names it produces.

    specs(info) gives each buffer's dtype and shape from the table alone (None: any length), so a
    reader can refuse a file before touching its data; table_keys / table_fields name and compute
    the extra per-layer table entries the layout needs to check its buffers. since is the file
    format version a layout needs (old readers refuse newer versions, so they never meet a
    layout name they do not know); padded names the twin a *_rows layout converts to.
    """

    name: str
    roles: tuple[str, ...]
    pack: Callable[[CompressedLayer], Buffers]
    unpack: Callable[[Mapping[str, np.ndarray], Any], np.ndarray]
    storage: Callable[[CompressedLayer], "Bits"]
    doc: str = ""
    specs: Callable[[Any], dict] | None = None
    table_keys: tuple[str, ...] = ()
    table_fields: Callable[[CompressedLayer], dict] | None = None
    since: int = 1  # the .spfq format version that introduced the layout (a file using it says >= this)
    padded: str | None = None  # *_rows layouts: the padded twin the kernels read (see `padded`)


# ---------------------------------------------------------------- layer metadata helpers

def layer_info(layer: CompressedLayer) -> dict:
    """The metadata unpack needs (the same keys the container stores per layer)."""
    return {"weight_shape": list(layer.weight_shape), "alphabet": layer.alphabet,
            "bits": int(layer.bits)}


def _get(info: Any, key: str, *default):
    if isinstance(info, Mapping):
        return info.get(key, *default) if default else info[key]
    return getattr(info, key, *default)


def _dims(info: Any) -> tuple[int, int]:
    shape = [int(s) for s in _get(info, "weight_shape")]
    return shape[0], int(np.prod(shape[1:], dtype=np.int64))


def field_bits(info: Any) -> int:
    """Bits per field of the int-style layouts (planes, offset, sparse)."""
    alphabet, bits = _get(info, "alphabet"), int(_get(info, "bits"))
    if alphabet == "int":
        if not 2 <= bits <= 8:
            raise ValueError(f"int alphabet needs 2..8 bits, got {bits}")
        return bits
    if alphabet in ("binary", "ternary"):
        return 2
    raise ValueError(f"unknown alphabet {alphabet!r}")


def _codes(layer: CompressedLayer) -> np.ndarray:
    N, d = layer.rows, layer.cols
    codes = np.asarray(layer.codes)
    if codes.dtype != np.int8 or codes.shape != (N, d):
        raise ValueError(f"{layer.name}: codes must be int8 {(N, d)}, "
                         f"got {codes.dtype} {codes.shape}")
    return codes.astype(np.int16)


def _check_limit(layer: CompressedLayer, codes: np.ndarray, b: int, layout: str) -> None:
    K = 2 ** (b - 1) - 1
    if codes.size and int(np.abs(codes).max()) > K:
        raise ValueError(f"{layer.name}: code outside [-{K}, {K}] for {b}-bit layout {layout!r}")


def _expect(buffers: Mapping[str, np.ndarray], role: str, shape: tuple, dtype) -> np.ndarray:
    if role not in buffers:
        raise ValueError(f"missing buffer {role!r}")
    a = np.asarray(buffers[role])
    if a.dtype != np.dtype(dtype) or tuple(a.shape) != tuple(shape):
        raise ValueError(f"buffer {role!r} is {a.dtype} {tuple(a.shape)}, expected "
                         f"{np.dtype(dtype)} {tuple(shape)}")
    return a


def _words(buffers, role, shape, d) -> np.ndarray:
    a = _expect(buffers, role, shape, B.WORD)
    if not B.padding_is_zero(a, d):
        raise ValueError(f"buffer {role!r} has nonzero padding bits")
    return a


# ---------------------------------------------------------------- sign

def _sign_bits(layer: CompressedLayer, layout: str) -> np.ndarray:
    codes = _codes(layer)
    if np.any((codes != 1) & (codes != -1)):
        raise ValueError(f"{layer.name}: layout {layout!r} needs codes in {{-1, +1}} "
                         "(zero codes need 'sign_mask')")
    return codes < 0


def _decode_sign(neg: np.ndarray) -> np.ndarray:
    return np.where(neg, -1, 1).astype(np.int8)


def _pack_sign(layer: CompressedLayer) -> Buffers:
    return {"sign": B.pack_bits(_sign_bits(layer, "sign"))}


def _specs_sign(info) -> dict:
    N, d = _dims(info)
    return {"sign": (B.WORD, (N, B.words_for(d)))}


def _unpack_sign(buffers, info) -> np.ndarray:
    N, d = _dims(info)
    return _decode_sign(B.unpack_bits(_words(buffers, "sign", (N, B.words_for(d)), d), d))


# ---------------------------------------------------------------- sign_mask

def _sign_mask_bits(layer: CompressedLayer, layout: str) -> tuple[np.ndarray, np.ndarray]:
    codes = _codes(layer)
    _check_limit(layer, codes, 2, layout)
    return codes < 0, codes != 0


def _decode_sign_mask(neg: np.ndarray, nz: np.ndarray) -> np.ndarray:
    if np.any(neg & ~nz):
        raise ValueError("sign bit set on a masked-out (zero) weight")
    return (nz.astype(np.int8) * np.where(neg, -1, 1)).astype(np.int8)


def _pack_sign_mask(layer: CompressedLayer) -> Buffers:
    neg, nz = _sign_mask_bits(layer, "sign_mask")
    return {"sign": B.pack_bits(neg), "mask": B.pack_bits(nz)}


def _specs_sign_mask(info) -> dict:
    N, d = _dims(info)
    return {"sign": (B.WORD, (N, B.words_for(d))), "mask": (B.WORD, (N, B.words_for(d)))}


def _unpack_sign_mask(buffers, info) -> np.ndarray:
    N, d = _dims(info)
    shape = (N, B.words_for(d))
    neg = B.unpack_bits(_words(buffers, "sign", shape, d), d)
    nz = B.unpack_bits(_words(buffers, "mask", shape, d), d)
    return _decode_sign_mask(neg, nz)


# ---------------------------------------------------------------- planes

def _plane_fields(layer: CompressedLayer, layout: str) -> tuple[np.ndarray, int]:
    b = field_bits(layer)
    codes = _codes(layer)
    _check_limit(layer, codes, b, layout)
    return codes + 2 ** (b - 1), b


def _decode_planes(u: np.ndarray, b: int) -> np.ndarray:
    if np.any(u == 0):
        raise ValueError("field u = 0 inside a row (not a valid offset code)")
    return (u.astype(np.int16) - 2 ** (b - 1)).astype(np.int8)


def _pack_planes(layer: CompressedLayer) -> Buffers:
    u, b = _plane_fields(layer, "planes")
    return {"planes": B.pack_planes(u, b)}


def _specs_planes(info) -> dict:
    N, d = _dims(info)
    return {"planes": (B.WORD, (field_bits(info), N, B.words_for(d)))}


def _unpack_planes(buffers, info) -> np.ndarray:
    N, d = _dims(info)
    b = field_bits(info)
    return _decode_planes(B.unpack_planes(_words(buffers, "planes", (b, N, B.words_for(d)), d), d), b)


# ---------------------------------------------------------------- sign_rows, sign_mask_rows, planes_rows

def _stream(info) -> tuple[int, int, int]:
    """(N, d, S): rows, columns and the words of one row stream holding all N*d fields."""
    N, d = _dims(info)
    return N, d, B.words_for(N * d)


def _stream_words(buffers, role, shape, N, d) -> np.ndarray:
    a = _expect(buffers, role, shape, B.WORD)
    if not B.padding_is_zero(a, N * d):
        raise ValueError(f"buffer {role!r} has nonzero padding bits after the last row")
    return a


def _pack_sign_rows(layer: CompressedLayer) -> Buffers:
    return {"sign": B.pack_rows(_sign_bits(layer, "sign_rows"))}


def _specs_sign_rows(info) -> dict:
    return {"sign": (B.WORD, (_stream(info)[2],))}


def _unpack_sign_rows(buffers, info) -> np.ndarray:
    N, d, S = _stream(info)
    return _decode_sign(B.unpack_rows(_stream_words(buffers, "sign", (S,), N, d), N, d))


def _pack_sign_mask_rows(layer: CompressedLayer) -> Buffers:
    neg, nz = _sign_mask_bits(layer, "sign_mask_rows")
    return {"sign": B.pack_rows(neg), "mask": B.pack_rows(nz)}


def _specs_sign_mask_rows(info) -> dict:
    S = _stream(info)[2]
    return {"sign": (B.WORD, (S,)), "mask": (B.WORD, (S,))}


def _unpack_sign_mask_rows(buffers, info) -> np.ndarray:
    N, d, S = _stream(info)
    neg = B.unpack_rows(_stream_words(buffers, "sign", (S,), N, d), N, d)
    nz = B.unpack_rows(_stream_words(buffers, "mask", (S,), N, d), N, d)
    return _decode_sign_mask(neg, nz)


def _pack_planes_rows(layer: CompressedLayer) -> Buffers:
    u, b = _plane_fields(layer, "planes_rows")
    return {"planes": B.pack_planes_rows(u, b)}


def _specs_planes_rows(info) -> dict:
    return {"planes": (B.WORD, (field_bits(info), _stream(info)[2]))}


def _unpack_planes_rows(buffers, info) -> np.ndarray:
    N, d, S = _stream(info)
    b = field_bits(info)
    planes = _stream_words(buffers, "planes", (b, S), N, d)
    return _decode_planes(B.unpack_planes_rows(planes, N, d), b)


# ---------------------------------------------------------------- offset

OFFSET_BITS = (2, 4, 8)


def _pack_offset(layer: CompressedLayer) -> Buffers:
    b = field_bits(layer)
    if b not in OFFSET_BITS:
        raise ValueError(f"{layer.name}: layout 'offset' needs 2, 4 or 8 bits, got {b}")
    codes = _codes(layer)
    _check_limit(layer, codes, b, "offset")
    N, d = codes.shape
    u = np.full((N, B.words_for(d) * B.WORD_BITS), 2 ** (b - 1), dtype=np.uint16)
    u[:, :d] = codes + 2 ** (b - 1)
    return {"codes": B.pack_fields(u, b)}


def _specs_offset(info) -> dict:
    N, d = _dims(info)
    b = field_bits(info)
    if b not in OFFSET_BITS:
        raise ValueError(f"layout 'offset' needs 2, 4 or 8 bits, got {b}")
    return {"codes": (np.dtype(np.uint8), (N, B.words_for(d) * 8 * b))}


def _unpack_offset(buffers, info) -> np.ndarray:
    N, d = _dims(info)
    b = field_bits(info)
    if b not in OFFSET_BITS:
        raise ValueError(f"layout 'offset' needs 2, 4 or 8 bits, got {b}")
    W = B.words_for(d)
    u = B.unpack_fields(_expect(buffers, "codes", (N, W * 8 * b), np.uint8), b)
    if np.any(u[:, d:] != 2 ** (b - 1)):
        raise ValueError("offset padding fields are not the zero code")
    if np.any(u[:, :d] == 0):
        raise ValueError("field u = 0 inside a row (not a valid offset code)")
    return (u[:, :d].astype(np.int16) - 2 ** (b - 1)).astype(np.int8)


# ---------------------------------------------------------------- sparse

def _kept_words(nnz_per_row: np.ndarray) -> int:
    return B.words_for(int(nnz_per_row.max())) if nnz_per_row.size else 0


def _pack_sparse(layer: CompressedLayer) -> Buffers:
    b = field_bits(layer)
    codes = _codes(layer)
    _check_limit(layer, codes, b, "sparse")
    N, _ = codes.shape
    nz = codes != 0
    Wk = _kept_words(nz.sum(axis=1))
    rows, cols = np.nonzero(nz)  # row-major: column order within each row
    rank = (np.cumsum(nz, axis=1) - 1)[rows, cols]
    k = codes[rows, cols]
    compact = np.zeros((N, Wk * B.WORD_BITS), dtype=np.uint16)
    compact[rows, rank] = (k < 0) | ((np.abs(k) - 1) << 1)
    return {"mask": B.pack_bits(nz), "kept": B.pack_planes(compact, b)}


def _sparse_fields(layer: CompressedLayer) -> dict:
    return {"row_nnz": [int(n) for n in (np.asarray(layer.codes) != 0).sum(axis=1)]}


def _row_nnz(info: Any, N: int, d: int) -> np.ndarray | None:
    """The table's per-row nonzero counts (None in files written before they were stored)."""
    counts = _get(info, "row_nnz", None)
    if counts is None:
        return None
    if not isinstance(counts, (list, tuple, np.ndarray)) or len(counts) != N or not all(
            isinstance(c, (int, np.integer)) and not isinstance(c, bool) and 0 <= c <= d for c in counts):
        raise ValueError(f"row_nnz must be {N} counts in 0..{d} (one per row)")
    return np.asarray(counts, dtype=np.int64).reshape(N)


def _specs_sparse(info) -> dict:
    N, d = _dims(info)
    counts = _row_nnz(info, N, d)
    Wk = None if counts is None else _kept_words(counts)
    return {"mask": (B.WORD, (N, B.words_for(d))), "kept": (B.WORD, (field_bits(info), N, Wk))}


def check_sparse(mask: np.ndarray, kept: np.ndarray, d: int, row_nnz=None):
    """Check that a sparse mask (N, W) and kept planes (b, N, Wk) describe the same weights.

    Per row: no mask bit in the padding, popcount == row_nnz (when known) and <= the Wk*64
    fields kept holds, no kept field past the popcount; Wk is the least that holds the fullest
    row. Raises ValueError naming the first bad row; returns (nonzero bools (N, d), counts,
    kept fields (N, Wk*64)) for the decoder.
    """
    N = mask.shape[0]
    tail = d % B.WORD_BITS
    if tail and mask.shape[-1]:
        bad = np.nonzero(mask[:, -1] >> np.uint64(tail))[0]
        if bad.size:
            raise ValueError(f"row {int(bad[0])}: mask bit set in the padding (column >= {d})")
    nz = B.unpack_bits(mask, d)
    counts = nz.sum(axis=1)
    if row_nnz is not None:
        bad = np.nonzero(counts != np.asarray(row_nnz))[0]
        if bad.size:
            r = int(bad[0])
            raise ValueError(f"row {r}: mask has {int(counts[r])} nonzero weights, row_nnz says {int(row_nnz[r])}")
    Wk = kept.shape[2]
    cap = Wk * B.WORD_BITS
    bad = np.nonzero(counts > cap)[0]
    if bad.size:
        r = int(bad[0])
        raise ValueError(f"row {r}: mask has {int(counts[r])} nonzero weights, buffer 'kept' holds {cap} per row")
    need = _kept_words(counts)
    if Wk != need:
        raise ValueError(f"buffer 'kept' has {Wk} words per row, the fullest mask row needs {need}")
    compact = B.unpack_planes(kept, cap) if N else np.zeros((0, cap), np.uint16)
    past = compact.astype(bool) & (np.arange(cap)[None, :] >= counts[:, None])
    bad = np.nonzero(past.any(axis=1))[0]
    if bad.size:
        r = int(bad[0])
        raise ValueError(f"row {r}: buffer 'kept' has a code past the row's {int(counts[r])} mask bits "
                         "(mask and kept disagree)")
    return nz, counts, compact


def _unpack_sparse(buffers, info) -> np.ndarray:
    N, d = _dims(info)
    b = field_bits(info)
    mask = _expect(buffers, "mask", (N, B.words_for(d)), B.WORD)
    counts = _row_nnz(info, N, d)
    if counts is not None:
        kept = _expect(buffers, "kept", (b, N, _kept_words(counts)), B.WORD)
    else:  # a file from before row_nnz: kept's own width, checked against the mask below
        have = np.asarray(buffers.get("kept", np.zeros(0)))
        kept = _expect(buffers, "kept", (b, N, have.shape[-1] if have.ndim == 3 else -1), B.WORD)
    nz, _, compact = check_sparse(mask, kept, d, counts)
    rows, cols = np.nonzero(nz)
    rank = (np.cumsum(nz, axis=1) - 1)[rows, cols]
    c = compact[rows, rank].astype(np.int16)
    if np.any((c >> 1) + 1 > 2 ** (b - 1) - 1):
        raise ValueError(f"kept field outside the {b}-bit range")
    codes = np.zeros((N, d), dtype=np.int8)
    codes[rows, cols] = np.where(c & 1, -1, 1) * ((c >> 1) + 1)
    return codes


# ---------------------------------------------------------------- storage traits

def _row_words(layer: CompressedLayer) -> tuple[int, int, int]:
    N, d = layer.rows, layer.cols
    W = B.words_for(d)
    return N, N * W * B.WORD_BITS, N * (W * B.WORD_BITS - d)


def _bits_sign(layer):
    _, total, pad = _row_words(layer)
    return Bits(total, pad)


def _bits_sign_mask(layer):
    _, total, pad = _row_words(layer)
    return Bits(total, pad, total, pad)


def _bits_dense(layer):  # planes and offset: b bits per padded field
    b = field_bits(layer)
    _, total, pad = _row_words(layer)
    return Bits(b * total, b * pad)


def _bits_rows(layer, planes: int, mask: bool):  # *_rows: one end-padded stream per plane/role
    fields = layer.rows * layer.cols
    total = B.words_for(fields) * B.WORD_BITS
    pad = total - fields
    return Bits(planes * total, planes * pad, total if mask else 0, pad if mask else 0)


def _bits_sign_rows(layer):
    return _bits_rows(layer, 1, False)


def _bits_sign_mask_rows(layer):
    return _bits_rows(layer, 1, True)


def _bits_planes_rows(layer):
    return _bits_rows(layer, field_bits(layer), False)


def _bits_sparse(layer):
    b = field_bits(layer)
    N, total, pad = _row_words(layer)
    nnz_row = (np.asarray(layer.codes) != 0).sum(axis=1)
    kept = N * _kept_words(nnz_row) * B.WORD_BITS
    return Bits(b * kept, b * (kept - int(nnz_row.sum())), total, pad)


# ---------------------------------------------------------------- registry

LAYOUTS: dict[str, Layout] = {}


def register(layout: Layout) -> Layout:
    """Add a layout to the registry (name must be new)."""
    if layout.name in LAYOUTS:
        raise ValueError(f"layout {layout.name!r} already registered")
    LAYOUTS[layout.name] = layout
    return layout


register(Layout("sign", ("sign",), _pack_sign, _unpack_sign, _bits_sign,
                "binary, 1 bit/weight", specs=_specs_sign))
register(Layout("sign_mask", ("sign", "mask"), _pack_sign_mask, _unpack_sign_mask,
                _bits_sign_mask, "ternary or pruned binary: sign bit + nonzero mask",
                specs=_specs_sign_mask))
register(Layout("planes", ("planes",), _pack_planes, _unpack_planes, _bits_dense,
                "b-bit offset codes as bit planes (bit-serial kernels)", specs=_specs_planes))
register(Layout("offset", ("codes",), _pack_offset, _unpack_offset, _bits_dense,
                "b-bit offset codes, 8/b per byte (nibble/byte kernels, MatMulNBits)",
                specs=_specs_offset))
register(Layout("sparse", ("mask", "kept"), _pack_sparse, _unpack_sparse, _bits_sparse,
                "nonzero mask + bit-plane packed kept codes (pruned int layers)",
                specs=_specs_sparse, table_keys=("row_nnz",), table_fields=_sparse_fields))
register(Layout("sign_rows", ("sign",), _pack_sign_rows, _unpack_sign_rows, _bits_sign_rows,
                "binary, 1 bit/weight, rows back to back (no per-row padding)",
                specs=_specs_sign_rows, since=2, padded="sign"))
register(Layout("sign_mask_rows", ("sign", "mask"), _pack_sign_mask_rows, _unpack_sign_mask_rows,
                _bits_sign_mask_rows, "sign bit + nonzero mask, rows back to back (no per-row padding)",
                specs=_specs_sign_mask_rows, since=2, padded="sign_mask"))
register(Layout("planes_rows", ("planes",), _pack_planes_rows, _unpack_planes_rows, _bits_planes_rows,
                "b-bit offset codes as bit planes, rows back to back (no per-row padding)",
                specs=_specs_planes_rows, since=2, padded="planes"))
ROWS_TWIN = {lay.padded: name for name, lay in LAYOUTS.items() if lay.padded}  # planes -> planes_rows


def get_layout(name: str) -> Layout:
    """Registry lookup with a clear error for unknown names."""
    try:
        return LAYOUTS[name]
    except KeyError:
        raise ValueError(f"unknown layout {name!r} (known: {', '.join(LAYOUTS)})") from None


def default_layout(layer: CompressedLayer) -> str:
    """The layout a layer gets unless the user asks for another one."""
    if layer.alphabet == "binary":
        return "sign_mask" if np.any(np.asarray(layer.codes) == 0) else "sign"
    if layer.alphabet == "ternary":
        return "sign_mask"
    if layer.alphabet == "int":
        return "sparse" if layer.lam is not None else "planes"
    raise ValueError(f"{layer.name}: unknown alphabet {layer.alphabet!r}")


def storage_layout(layer: CompressedLayer) -> str:
    """The layout `save` writes a layer in unless told otherwise: default_layout, or its *_rows
    twin when the rows are not whole words (d % 64 != 0), where per-row padding would cost bits.
    default_layout stays what the kernels read."""
    name = default_layout(layer)
    twin = ROWS_TWIN.get(name)
    return twin if twin is not None and layer.cols % B.WORD_BITS else name


def padded(layout: str, buffers: Mapping[str, np.ndarray], info: Any) -> tuple[str, Buffers]:
    """(layout, buffers) as the kernels read them: a *_rows layout's buffers become its padded
    twin's (rows padded to whole words with zero bits; dtype, shape and the zero end padding
    are checked, code values are not: unpack_layer checks those); any other layout is returned
    as it is. The one place a stored row stream turns into kernel words."""
    lay = get_layout(layout)
    if lay.padded is None:
        return layout, {role: np.asarray(buffers[role]) for role in lay.roles if role in buffers}
    shapes = buffer_specs(layout, info)
    N, d, _ = _stream(info)
    out = {}
    for role in lay.roles:
        stream = _stream_words(buffers, role, shapes[role][1], N, d)
        out[role] = np.ascontiguousarray(B.pack_bits(B.unpack_rows(stream, N, d)))
    return lay.padded, out


def pack_layer(layer: CompressedLayer, layout: str | None = None) -> Buffers:
    """Pack a layer's codes into the named layout (default_layout when None)."""
    out = get_layout(layout or default_layout(layer)).pack(layer)
    return {role: np.ascontiguousarray(a) for role, a in out.items()}


def buffer_specs(layout: str, info: Any) -> dict[str, tuple[np.dtype, tuple]]:
    """{role: (dtype, shape)} of a layer's buffers from its table entry alone (None in a shape:
    any length), so a reader refuses mismatched dims before reading any data."""
    lay = get_layout(layout)
    if lay.specs is None:
        return {}
    return {role: (np.dtype(dt), tuple(shape)) for role, (dt, shape) in lay.specs(info).items()}


def table_fields(layer: CompressedLayer, layout: str) -> dict:
    """Extra layer-table entries a layout needs to check its buffers on load (sparse: row_nnz)."""
    lay = get_layout(layout)
    return lay.table_fields(layer) if lay.table_fields else {}


def unpack_layer(layout: str, buffers: Mapping[str, np.ndarray], info: Any) -> np.ndarray:
    """Int8 codes (N, d) from packed buffers; info is a dict (or object) with weight_shape,
    alphabet and bits (and the layout's table_keys where stored). Raises ValueError when the
    buffers do not match the metadata."""
    return get_layout(layout).unpack(buffers, info)


# ---------------------------------------------------------------- storage accounting

def storage_report(layer: CompressedLayer, layout: str | None = None) -> dict:
    """Exact bit counts of a layer in a layout (storage_layout when None: what save writes),
    for `inspect` and the bits/weight claims.

    scale (and lam when present) count as 16 bits per row, or per (row, group) with group-wise
    scales: they are stored as float16.
    The bias is not part of bits/weight (an fp32 model has it too); it is reported in bytes.
    """
    layout = layout or storage_layout(layer)
    bits = get_layout(layout).storage(layer)
    N = layer.rows
    scale_bits = 16 * N * layer.ngroups * (2 if layer.lam is not None else 1)
    total = bits.code + bits.mask + scale_bits
    weights = N * layer.cols
    return {
        "layout": layout,
        "code_bits": int(bits.code),
        "mask_bits": int(bits.mask),
        "scale_bits": int(scale_bits),
        "padding_bits": int(bits.code_pad + bits.mask_pad),
        "total_bits": int(total),
        "weights": int(weights),
        "bits_per_weight": total / weights if weights else 0.0,
        "bias_bytes": 4 * N if layer.bias is not None else 0,
    }
