"""Packed layouts: exact round trips, byte-for-byte agreement with an independent bitarray
encoder, validation, and exact storage accounting."""

from fractions import Fraction

import numpy as np
import pytest
from bitarray import bitarray
from bitarray.util import int2ba

from spfq_deploy.compressed import CompressedLayer
from spfq_deploy.pack import (
    default_layout,
    layer_info,
    pack_bits,
    pack_layer,
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


def ref_sign(codes):
    return rows_stream([[c < 0 for c in row] for row in codes.tolist()])


def ref_mask(codes):
    return rows_stream([[c != 0 for c in row] for row in codes.tolist()])


def ref_planes(codes, b):
    u = [[c + 2 ** (b - 1) for c in row] for row in codes.tolist()]
    return b"".join(rows_stream([[(x >> p) & 1 for x in row] for row in u]) for p in range(b))


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
