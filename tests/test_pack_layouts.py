"""Packed layouts: exact round trips, byte-for-byte agreement with an independent bitarray
encoder, validation, and exact storage accounting."""

from fractions import Fraction

import numpy as np
import pytest
from bitarray import bitarray
from bitarray.util import int2ba

from spfq_deploy.compressed import CompressedLayer
from spfq_deploy.kernels import kernel_pack
from spfq_deploy.pack import (
    LAYOUTS,
    buffer_specs,
    default_layout,
    layer_info,
    pack_bits,
    pack_layer,
    padded,
    storage_layout,
    storage_report,
    unpack_bits,
    unpack_layer,
    words_for,
)

DS = (1, 9, 63, 64, 65, 100, 3136)
NS = (1, 7, 32)
SHAPES = [(n, d) for n in NS for d in DS] + [(32, 9)]


def make_layer(alphabet, bits, N, d, rng, sparsity=0.0, lam=False, kind="linear"):
    K = 1 if alphabet in ("binary", "ternary") else 2 ** (bits - 1) - 1
    if alphabet == "binary":
        codes = rng.choice(np.array([-1, 1], dtype=np.int8), size=(N, d))
    else:
        codes = rng.integers(-K, K + 1, size=(N, d)).astype(np.int8)
        if alphabet == "int" and sparsity > 0:  # nonzero levels only, then prune
            codes[codes == 0] = K
    codes.flat[0] = K  # always include the extreme levels
    codes.flat[-1] = -K
    if sparsity > 0:
        codes[rng.random((N, d)) < sparsity] = 0
        if sparsity >= 1.0:
            codes[:] = 0
    scale = rng.random(N).astype(np.float16).astype(np.float32) + np.float32(0.5)
    meta = {"sparsity_target": sparsity} if sparsity else {}
    return CompressedLayer(
        name="l", kind=kind, weight_shape=(N, d), alphabet=alphabet, bits=bits, codes=codes,
        scale=scale, lam=(scale * 2 if lam else None), meta=meta)


def roundtrip(layer, layout):
    bufs = pack_layer(layer, layout)
    out = unpack_layer(layout, bufs, layer_info(layer))
    assert out.dtype == np.int8 and out.shape == layer.codes.shape
    np.testing.assert_array_equal(out, layer.codes)
    return bufs


# ---------------------------------------------------------------- exact round trips

@pytest.mark.parametrize("N,d", SHAPES)
def test_sign_roundtrip(N, d):
    layer = make_layer("binary", 1, N, d, np.random.default_rng(d * 100 + N))
    bufs = roundtrip(layer, "sign")
    assert bufs["sign"].dtype == np.dtype("<u8") and bufs["sign"].shape == (N, words_for(d))


@pytest.mark.parametrize("N,d", SHAPES)
@pytest.mark.parametrize("alphabet,bits", [("ternary", 2), ("binary", 1)])
def test_sign_mask_roundtrip(N, d, alphabet, bits):
    rng = np.random.default_rng(d * 100 + N)
    layer = make_layer(alphabet, bits, N, d, rng, sparsity=0.3 if alphabet == "binary" else 0.0)
    bufs = roundtrip(layer, "sign_mask")
    assert set(bufs) == {"sign", "mask"}


@pytest.mark.parametrize("bits", range(2, 9))
def test_planes_roundtrip(bits):
    rng = np.random.default_rng(bits)
    for N, d in SHAPES:
        layer = make_layer("int", bits, N, d, rng)
        bufs = roundtrip(layer, "planes")
        assert bufs["planes"].shape == (bits, N, words_for(d))


@pytest.mark.parametrize("bits", (2, 4, 8))
def test_offset_roundtrip(bits):
    rng = np.random.default_rng(bits)
    for N, d in SHAPES:
        layer = make_layer("int", bits, N, d, rng)
        bufs = roundtrip(layer, "offset")
        assert bufs["codes"].dtype == np.uint8
        assert bufs["codes"].shape == (N, words_for(d) * 8 * bits)


@pytest.mark.parametrize("sparsity", (0.0, 0.5, 0.95, 1.0))
@pytest.mark.parametrize("bits", range(2, 9))
def test_sparse_roundtrip(bits, sparsity):
    rng = np.random.default_rng(bits * 10 + int(sparsity * 100))
    for N, d in SHAPES:
        layer = make_layer("int", bits, N, d, rng, sparsity=sparsity, lam=True)
        bufs = roundtrip(layer, "sparse")
        nnz = int((layer.codes != 0).sum(axis=1).max())
        assert bufs["kept"].shape == (bits, N, words_for(nnz))
        if sparsity == 1.0:
            assert bufs["kept"].shape[2] == 0 and not bufs["mask"].any()


def test_ternary_and_binary_in_int_layouts():
    """binary/ternary codes fit the 2-bit int layouts (MatMulNBits bits=2 export path)."""
    rng = np.random.default_rng(3)
    for alphabet, bits in (("ternary", 2), ("binary", 1)):
        layer = make_layer(alphabet, bits, 7, 65, rng)
        for layout in ("planes", "offset", "sparse"):
            assert roundtrip(layer, layout)


# ---------------------------------------------------------------- bit conventions, by hand

def test_word_bit_order_literal():
    bits = np.zeros((1, 130), dtype=bool)
    bits[0, [0, 2, 63, 64, 129]] = True
    words = pack_bits(bits)
    assert words.dtype == np.dtype("<u8") and words.shape == (1, 3)
    assert words[0, 0] == (1 | 4 | (1 << 63))
    assert words[0, 1] == 1
    assert words[0, 2] == 2
    assert words.tobytes()[:8] == bytes([0b101, 0, 0, 0, 0, 0, 0, 0x80])
    np.testing.assert_array_equal(unpack_bits(words, 130), bits)


def test_sign_bit_is_one_for_minus():
    layer = make_layer("binary", 1, 1, 3, np.random.default_rng(0))
    layer.codes[:] = [[-1, 1, -1]]
    assert pack_layer(layer, "sign")["sign"][0, 0] == 0b101


def test_offset_nibble_literal():
    layer = make_layer("int", 4, 1, 2, np.random.default_rng(0))
    layer.codes[:] = [[-7, 3]]  # u = 1, 11 -> byte 0 = 1 | 11 << 4; padding u = 8 -> 0x88
    codes = pack_layer(layer, "offset")["codes"]
    assert codes.shape == (1, 32)
    assert codes[0, 0] == (1 | (11 << 4)) and np.all(codes[0, 1:] == 0x88)


# ---------------------------------------------------------------- independent bitarray encoder

def rows_stream(rows_bits):
    """Each row's bits appended LSB first and padded to a multiple of 64 with zero bits."""
    ba = bitarray(endian="little")
    for row in rows_bits:
        ba.extend(bool(x) for x in row)
        ba.extend([0] * (-len(row) % 64))
    return ba.tobytes()


def ref_sign(codes, stream=rows_stream):
    return stream([[c < 0 for c in row] for row in codes.tolist()])


def ref_mask(codes, stream=rows_stream):
    return stream([[c != 0 for c in row] for row in codes.tolist()])


def ref_planes(codes, b, stream=rows_stream):
    u = [[c + 2 ** (b - 1) for c in row] for row in codes.tolist()]
    return b"".join(stream([[(x >> p) & 1 for x in row] for row in u]) for p in range(b))


def ref_offset(codes, b):
    out = b""
    for row in codes.tolist():
        ba = bitarray(endian="little")
        fields = [c + 2 ** (b - 1) for c in row]
        fields += [2 ** (b - 1)] * (-len(fields) % 64)
        for u in fields:
            ba.extend(int2ba(u, length=b, endian="little"))
        out += ba.tobytes()
    return out


def ref_kept(codes, b):
    compact = [[(1 if c < 0 else 0) | ((abs(c) - 1) << 1) for c in row if c != 0]
               for row in codes.tolist()]
    width = -(-max(len(r) for r in compact) // 64) * 64
    compact = [r + [0] * (width - len(r)) for r in compact]
    return b"".join(rows_stream([[(x >> p) & 1 for x in row] for row in compact])
                    for p in range(b))


BYTE_SHAPES = [(1, 1), (7, 9), (3, 63), (2, 64), (7, 65), (32, 9), (2, 100), (2, 3136)]


@pytest.mark.parametrize("N,d", BYTE_SHAPES)
def test_bytes_match_bitarray_sign(N, d):
    layer = make_layer("binary", 1, N, d, np.random.default_rng(d))
    assert pack_layer(layer, "sign")["sign"].tobytes() == ref_sign(layer.codes)


@pytest.mark.parametrize("N,d", BYTE_SHAPES)
def test_bytes_match_bitarray_sign_mask(N, d):
    layer = make_layer("ternary", 2, N, d, np.random.default_rng(d))
    bufs = pack_layer(layer, "sign_mask")
    assert bufs["sign"].tobytes() == ref_sign(layer.codes)
    assert bufs["mask"].tobytes() == ref_mask(layer.codes)


@pytest.mark.parametrize("N,d", BYTE_SHAPES)
@pytest.mark.parametrize("bits", range(2, 9))
def test_bytes_match_bitarray_planes(N, d, bits):
    layer = make_layer("int", bits, N, d, np.random.default_rng(d + bits))
    assert pack_layer(layer, "planes")["planes"].tobytes() == ref_planes(layer.codes, bits)


@pytest.mark.parametrize("N,d", BYTE_SHAPES)
@pytest.mark.parametrize("bits", (2, 4, 8))
def test_bytes_match_bitarray_offset(N, d, bits):
    layer = make_layer("int", bits, N, d, np.random.default_rng(d + bits))
    assert pack_layer(layer, "offset")["codes"].tobytes() == ref_offset(layer.codes, bits)


@pytest.mark.parametrize("N,d", BYTE_SHAPES)
@pytest.mark.parametrize("bits,sparsity", [(2, 0.5), (3, 0.0), (4, 0.95), (6, 0.5), (8, 0.7)])
def test_bytes_match_bitarray_sparse(N, d, bits, sparsity):
    layer = make_layer("int", bits, N, d, np.random.default_rng(d + bits), sparsity=sparsity,
                       lam=True)
    bufs = pack_layer(layer, "sparse")
    assert bufs["mask"].tobytes() == ref_mask(layer.codes)
    assert bufs["kept"].tobytes() == ref_kept(layer.codes, bits)


# ---------------------------------------------------------------- validation

def test_pack_rejects_codes_that_do_not_fit():
    rng = np.random.default_rng(0)
    ternary = make_layer("ternary", 2, 4, 10, rng)
    ternary.codes[0, 0] = 0
    with pytest.raises(ValueError, match="sign"):
        pack_layer(ternary, "sign")
    int4 = make_layer("int", 4, 4, 10, rng)
    int4.codes[0, 0] = -8  # |k| > K = 7
    for layout in ("planes", "offset", "sparse", "sign_mask"):
        with pytest.raises(ValueError):
            pack_layer(int4, layout)
    with pytest.raises(ValueError, match="offset"):
        pack_layer(make_layer("int", 3, 4, 10, rng), "offset")
    with pytest.raises(ValueError, match="unknown layout"):
        pack_layer(int4, "nibbles")


def test_unpack_rejects_bad_buffers():
    layer = make_layer("binary", 1, 2, 65, np.random.default_rng(0))
    bufs = pack_layer(layer, "sign")
    info = layer_info(layer)
    dirty = bufs["sign"].copy()
    dirty[0, 1] |= np.uint64(1 << 5)  # a padding bit (column 69 >= d)
    with pytest.raises(ValueError, match="padding"):
        unpack_layer("sign", {"sign": dirty}, info)
    with pytest.raises(ValueError, match="expected"):
        unpack_layer("sign", {"sign": bufs["sign"][:, :1]}, info)
    with pytest.raises(ValueError, match="missing"):
        unpack_layer("sign_mask", bufs, info)


def test_default_layout():
    rng = np.random.default_rng(0)
    assert default_layout(make_layer("binary", 1, 4, 10, rng)) == "sign"
    assert default_layout(make_layer("binary", 1, 4, 10, rng, sparsity=0.5)) == "sign_mask"
    assert default_layout(make_layer("ternary", 2, 4, 10, rng)) == "sign_mask"
    assert default_layout(make_layer("int", 4, 4, 10, rng)) == "planes"
    assert default_layout(make_layer("int", 4, 4, 10, rng, sparsity=0.5, lam=True)) == "sparse"


# ---------------------------------------------------------------- storage accounting

def test_storage_binary_3136_exact():
    layer = make_layer("binary", 1, 7, 3136, np.random.default_rng(0))
    r = storage_report(layer, "sign")
    assert Fraction(r["total_bits"], r["weights"]) == 1 + Fraction(16, 3136)
    assert r["bits_per_weight"] == 1 + 16 / 3136
    assert r["padding_bits"] == 0 and r["mask_bits"] == 0
    assert r["scale_bits"] == 16 * 7 and r["weights"] == 7 * 3136


def test_storage_counts_padding_d65():
    rng = np.random.default_rng(0)
    N = 7
    r = storage_report(make_layer("binary", 1, N, 65, rng), "sign")
    assert (r["code_bits"], r["padding_bits"], r["total_bits"]) == (N * 128, N * 63, N * 144)
    r = storage_report(make_layer("ternary", 2, N, 65, rng), "sign_mask")
    assert (r["code_bits"], r["mask_bits"], r["padding_bits"]) == (N * 128, N * 128, 2 * N * 63)
    r = storage_report(make_layer("int", 3, N, 65, rng), "planes")
    assert (r["code_bits"], r["padding_bits"]) == (3 * N * 128, 3 * N * 63)
    r = storage_report(make_layer("int", 4, N, 65, rng), "offset")
    assert (r["code_bits"], r["padding_bits"]) == (4 * N * 128, 4 * N * 63)


def test_storage_sparse_counts_buffers_and_lam():
    layer = make_layer("int", 4, 7, 65, np.random.default_rng(1), sparsity=0.5, lam=True)
    layer.bias = np.zeros(7, np.float32)
    r = storage_report(layer, "sparse")
    bufs = pack_layer(layer, "sparse")
    nnz = int((layer.codes != 0).sum())
    assert r["code_bits"] == bufs["kept"].nbytes * 8 and r["mask_bits"] == bufs["mask"].nbytes * 8
    assert r["padding_bits"] == (r["code_bits"] - 4 * nnz) + 7 * 63
    assert r["scale_bits"] == 2 * 16 * 7 and r["bias_bytes"] == 28
    assert r["total_bits"] == r["code_bits"] + r["mask_bits"] + r["scale_bits"]


@pytest.mark.parametrize("layout,alphabet,bits", [
    ("sign", "binary", 1), ("sign_mask", "ternary", 2), ("planes", "int", 5),
    ("offset", "int", 8), ("sparse", "int", 3)])
def test_storage_matches_buffer_sizes(layout, alphabet, bits):
    layer = make_layer(alphabet, bits, 32, 100, np.random.default_rng(2),
                       sparsity=0.6 if layout == "sparse" else 0.0)
    r = storage_report(layer, layout)
    buffer_bits = sum(a.nbytes * 8 for a in pack_layer(layer, layout).values())
    assert r["code_bits"] + r["mask_bits"] == buffer_bits


# ---------------------------------------------------------------- *_rows: rows back to back, no per-row padding

ROWS_DS = (1, 9, 27, 63, 64, 65, 200)
ROWS_SHAPES = [(n, d) for n in NS for d in ROWS_DS]
TWINS = {"sign_rows": "sign", "sign_mask_rows": "sign_mask", "planes_rows": "planes"}


def whole_stream(rows_bits):
    """All rows' bits appended LSB first with no gap; only the end padded to 64 with zero bits."""
    ba = bitarray(endian="little")
    for row in rows_bits:
        ba.extend(bool(x) for x in row)
    ba.extend([0] * (-len(ba) % 64))
    return ba.tobytes()


def ref_sign_rows(codes):
    return ref_sign(codes, whole_stream)


def ref_mask_rows(codes):
    return ref_mask(codes, whole_stream)


def ref_planes_rows(codes, b):
    return ref_planes(codes, b, whole_stream)


def stream_words(N, d):
    return -(-N * d // 64)


@pytest.mark.parametrize("N,d", ROWS_SHAPES)
def test_sign_rows_roundtrip(N, d):
    layer = make_layer("binary", 1, N, d, np.random.default_rng(d * 100 + N))
    bufs = roundtrip(layer, "sign_rows")
    assert set(bufs) == {"sign"}
    assert bufs["sign"].dtype == np.dtype("<u8") and bufs["sign"].shape == (stream_words(N, d),)


@pytest.mark.parametrize("N,d", ROWS_SHAPES)
@pytest.mark.parametrize("alphabet,bits", [("ternary", 2), ("binary", 1)])
def test_sign_mask_rows_roundtrip(N, d, alphabet, bits):
    rng = np.random.default_rng(d * 100 + N)
    layer = make_layer(alphabet, bits, N, d, rng, sparsity=0.3 if alphabet == "binary" else 0.0)
    bufs = roundtrip(layer, "sign_mask_rows")
    assert {r: a.shape for r, a in bufs.items()} == {"sign": (stream_words(N, d),), "mask": (stream_words(N, d),)}


@pytest.mark.parametrize("bits", range(2, 9))
def test_planes_rows_roundtrip(bits):
    rng = np.random.default_rng(bits)
    for N, d in ROWS_SHAPES:
        layer = make_layer("int", bits, N, d, rng)
        bufs = roundtrip(layer, "planes_rows")
        assert bufs["planes"].dtype == np.dtype("<u8") and bufs["planes"].shape == (bits, stream_words(N, d))


def test_binary_and_ternary_in_planes_rows():
    rng = np.random.default_rng(5)
    for alphabet, bits in (("ternary", 2), ("binary", 1)):
        assert roundtrip(make_layer(alphabet, bits, 7, 9, rng), "planes_rows")["planes"].shape == (2, 1)


def test_rows_stream_literal():
    """Rows follow each other with no gap: row 1 of a d = 3 layer starts at bit 3 of word 0."""
    layer = make_layer("binary", 1, 2, 3, np.random.default_rng(0))
    layer.codes[:] = [[-1, 1, 1], [1, -1, -1]]  # bits 0, 4, 5
    sign = pack_layer(layer, "sign_rows")["sign"]
    assert sign.shape == (1,) and sign[0] == 0b110001
    int3 = make_layer("int", 3, 2, 3, np.random.default_rng(0))
    int3.codes[:] = [[-3, 0, 3], [1, -1, 2]]  # u = 1, 4, 7, 5, 3, 6 at bits 0..5
    planes = pack_layer(int3, "planes_rows")["planes"]
    u = [1, 4, 7, 5, 3, 6]
    assert [int(w) for w in planes[:, 0]] == [sum(((x >> p) & 1) << i for i, x in enumerate(u)) for p in range(3)]


ROWS_BYTE_SHAPES = [(1, 1), (7, 9), (32, 9), (5, 27), (3, 63), (2, 64), (7, 65), (3, 200), (1, 3136)]


@pytest.mark.parametrize("N,d", ROWS_BYTE_SHAPES)
def test_bytes_match_bitarray_sign_rows(N, d):
    layer = make_layer("binary", 1, N, d, np.random.default_rng(d + N))
    assert pack_layer(layer, "sign_rows")["sign"].tobytes() == ref_sign_rows(layer.codes)


@pytest.mark.parametrize("N,d", ROWS_BYTE_SHAPES)
@pytest.mark.parametrize("alphabet,bits,sparsity", [("ternary", 2, 0.0), ("binary", 1, 0.4)])
def test_bytes_match_bitarray_sign_mask_rows(N, d, alphabet, bits, sparsity):
    layer = make_layer(alphabet, bits, N, d, np.random.default_rng(d + N), sparsity=sparsity)
    bufs = pack_layer(layer, "sign_mask_rows")
    assert bufs["sign"].tobytes() == ref_sign_rows(layer.codes)
    assert bufs["mask"].tobytes() == ref_mask_rows(layer.codes)


@pytest.mark.parametrize("N,d", ROWS_BYTE_SHAPES)
@pytest.mark.parametrize("bits", range(2, 9))
def test_bytes_match_bitarray_planes_rows(N, d, bits):
    layer = make_layer("int", bits, N, d, np.random.default_rng(d + N + bits))
    assert pack_layer(layer, "planes_rows")["planes"].tobytes() == ref_planes_rows(layer.codes, bits)


@pytest.mark.parametrize("rows,twin", TWINS.items())
def test_rows_bytes_equal_padded_twin_for_whole_words(rows, twin):
    """For d a multiple of 64 there is no padding to drop: a row stream is the padded buffer."""
    alphabet, bits = {"sign": ("binary", 1), "sign_mask": ("ternary", 2), "planes": ("int", 5)}[twin]
    layer = make_layer(alphabet, bits, 3, 128, np.random.default_rng(1))
    a, b = pack_layer(layer, rows), pack_layer(layer, twin)
    assert {r: x.tobytes() for r, x in a.items()} == {r: x.tobytes() for r, x in b.items()}


def set_bit(words, i):
    """Copy of a row stream (..., S) with stream bit i set in every leading slice."""
    out = words.copy()
    out[..., i // 64] |= np.uint64(1) << np.uint64(i % 64)
    return out


@pytest.mark.parametrize("layout,alphabet,bits", [
    ("sign_rows", "binary", 1), ("sign_mask_rows", "ternary", 2), ("planes_rows", "int", 4)])
def test_rows_reject_nonzero_end_padding(layout, alphabet, bits):
    N, d = 7, 9  # 63 fields: stream bit 63 is the one padding bit
    layer = make_layer(alphabet, bits, N, d, np.random.default_rng(0))
    info = layer_info(layer)
    bufs = pack_layer(layer, layout)
    for role in bufs:
        dirty = dict(bufs)
        dirty[role] = set_bit(bufs[role], N * d)
        with pytest.raises(ValueError, match=f"{role}.*padding"):
            unpack_layer(layout, dirty, info)
        with pytest.raises(ValueError, match="padding"):
            padded(layout, dirty, info)
    if layout == "planes_rows":  # one plane dirty, the others clean
        dirty = bufs["planes"].copy()
        dirty[2] = set_bit(bufs["planes"][2], N * d)
        with pytest.raises(ValueError, match="padding"):
            unpack_layer(layout, {"planes": dirty}, info)


def test_rows_reject_wrong_shapes_and_missing_buffers():
    layer = make_layer("int", 4, 7, 9, np.random.default_rng(0))
    info = layer_info(layer)
    twin = pack_layer(layer, "planes")["planes"]  # (4, 7, 1): the padded shape
    with pytest.raises(ValueError, match="expected"):
        unpack_layer("planes_rows", {"planes": twin}, info)
    flat = pack_layer(layer, "planes_rows")["planes"]
    with pytest.raises(ValueError, match="expected"):
        unpack_layer("planes_rows", {"planes": flat[:3]}, info)  # a plane short
    with pytest.raises(ValueError, match="expected"):
        unpack_layer("planes_rows", {"planes": flat.astype(np.int64)}, info)
    tern = make_layer("ternary", 2, 7, 9, np.random.default_rng(0))
    bufs = pack_layer(tern, "sign_mask_rows")
    with pytest.raises(ValueError, match="missing buffer 'mask'"):
        unpack_layer("sign_mask_rows", {"sign": bufs["sign"]}, layer_info(tern))
    with pytest.raises(ValueError, match="expected"):
        unpack_layer("sign_rows", {"sign": np.zeros(2, np.uint64)}, layer_info(tern))
    assert buffer_specs("sign_mask_rows", layer_info(tern)) == {
        "sign": (np.dtype("<u8"), (1,)), "mask": (np.dtype("<u8"), (1,))}
    assert buffer_specs("planes_rows", {"weight_shape": [32, 1, 3, 3], "alphabet": "int", "bits": 4}) == {
        "planes": (np.dtype("<u8"), (4, 5))}


def test_planes_rows_rejects_u0_and_sign_mask_rows_rejects_stray_sign():
    layer = make_layer("int", 4, 7, 9, np.random.default_rng(0))
    planes = pack_layer(layer, "planes_rows")["planes"]
    i = 5 * 9 + 4  # row 5, column 4
    zero = planes.copy()
    zero[:, i // 64] &= ~(np.uint64(1) << np.uint64(i % 64))  # u = 0 at that field
    with pytest.raises(ValueError, match="u = 0"):
        unpack_layer("planes_rows", {"planes": zero}, layer_info(layer))
    tern = make_layer("ternary", 2, 7, 9, np.random.default_rng(0))
    tern.codes[5, 4] = 0
    bufs = pack_layer(tern, "sign_mask_rows")
    with pytest.raises(ValueError, match="masked-out"):
        unpack_layer("sign_mask_rows", {**bufs, "sign": set_bit(bufs["sign"], i)}, layer_info(tern))


def test_rows_pack_rejects_codes_that_do_not_fit():
    rng = np.random.default_rng(0)
    tern = make_layer("ternary", 2, 4, 9, rng)
    tern.codes[0, 0] = 0
    with pytest.raises(ValueError, match="sign_rows"):
        pack_layer(tern, "sign_rows")
    int4 = make_layer("int", 4, 4, 9, rng)
    int4.codes[0, 0] = -8
    for layout in ("planes_rows", "sign_mask_rows"):
        with pytest.raises(ValueError, match=layout):
            pack_layer(int4, layout)


@pytest.mark.parametrize("N,d", [(7, 9), (32, 9), (5, 27), (2, 64), (7, 65), (3, 200)])
@pytest.mark.parametrize("rows,twin", TWINS.items())
def test_padded_gives_the_twins_buffers(N, d, rows, twin):
    alphabet, bits = {"sign": ("binary", 1), "sign_mask": ("ternary", 2), "planes": ("int", 6)}[twin]
    layer = make_layer(alphabet, bits, N, d, np.random.default_rng(N * d))
    name, bufs = padded(rows, pack_layer(layer, rows), layer_info(layer))
    want = pack_layer(layer, twin)
    assert name == twin and set(bufs) == set(want)
    for role in want:
        assert bufs[role].dtype == want[role].dtype and bufs[role].shape == want[role].shape
        assert bufs[role].tobytes() == want[role].tobytes()
    same = pack_layer(layer, twin)
    name, bufs = padded(twin, same, layer_info(layer))
    assert name == twin and all(bufs[r] is same[r] for r in same)


def test_kernel_pack_takes_rows_layouts_as_their_twins():
    layer = make_layer("int", 4, 32, 9, np.random.default_rng(0))
    layout, bits, bufs = kernel_pack(layer, "planes_rows")
    assert (layout, bits) == ("planes", 4) and bufs["planes"].shape == (4, 32, 1)


def test_storage_layout_picks_rows_twin_only_when_rows_are_not_whole_words():
    rng = np.random.default_rng(0)
    for d, suffix in ((9, "_rows"), (27, "_rows"), (65, "_rows"), (64, ""), (128, "")):
        assert storage_layout(make_layer("binary", 1, 4, d, rng)) == "sign" + suffix
        assert storage_layout(make_layer("binary", 1, 4, d, rng, sparsity=0.5)) == "sign_mask" + suffix
        assert storage_layout(make_layer("ternary", 2, 4, d, rng)) == "sign_mask" + suffix
        assert storage_layout(make_layer("int", 4, 4, d, rng)) == "planes" + suffix
        assert storage_layout(make_layer("int", 4, 4, d, rng, sparsity=0.5, lam=True)) == "sparse"
    assert default_layout(make_layer("int", 4, 4, 9, rng)) == "planes"  # what the kernels read
    assert {n: lay.padded for n, lay in LAYOUTS.items() if lay.padded} == TWINS
    assert {n: lay.since for n, lay in LAYOUTS.items() if lay.since > 1} == dict.fromkeys(TWINS, 2)


def test_storage_depthwise_4bit_rows_exact():
    """A depthwise 3x3 layer, 32 channels, 4 bits: 288 fields in 5 words per plane."""
    layer = make_layer("int", 4, 32, 9, np.random.default_rng(0))
    r = storage_report(layer)
    assert r["layout"] == "planes_rows"
    assert (r["code_bits"], r["padding_bits"], r["scale_bits"]) == (4 * 320, 4 * 32, 32 * 16)
    assert Fraction(r["total_bits"], r["weights"]) == Fraction(4 * 320 + 512, 288) == Fraction(56, 9)
    old = storage_report(layer, "planes")  # one 64-bit word per row and plane
    assert Fraction(old["total_bits"], old["weights"]) == Fraction(4 * 32 * 64 + 512, 288)


def test_storage_rows_counts_end_padding_only():
    rng = np.random.default_rng(0)
    N, d = 7, 65  # 455 fields -> 8 words, 57 padding bits per stream
    r = storage_report(make_layer("binary", 1, N, d, rng), "sign_rows")
    assert (r["code_bits"], r["mask_bits"], r["padding_bits"]) == (512, 0, 57)
    r = storage_report(make_layer("ternary", 2, N, d, rng), "sign_mask_rows")
    assert (r["code_bits"], r["mask_bits"], r["padding_bits"]) == (512, 512, 2 * 57)
    r = storage_report(make_layer("int", 3, N, d, rng), "planes_rows")
    assert (r["code_bits"], r["padding_bits"]) == (3 * 512, 3 * 57)
    r = storage_report(make_layer("int", 3, 2, 64, rng), "planes_rows")
    assert r["padding_bits"] == 0


@pytest.mark.parametrize("N,d", [(32, 9), (7, 65), (3, 200), (1, 1)])
@pytest.mark.parametrize("layout,alphabet,bits", [
    ("sign_rows", "binary", 1), ("sign_mask_rows", "ternary", 2), ("planes_rows", "int", 7)])
def test_storage_rows_matches_buffer_sizes(N, d, layout, alphabet, bits):
    layer = make_layer(alphabet, bits, N, d, np.random.default_rng(2))
    r = storage_report(layer, layout)
    assert r["code_bits"] + r["mask_bits"] == sum(a.nbytes * 8 for a in pack_layer(layer, layout).values())
