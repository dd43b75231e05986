"""Word-level bit packing: the one bit order every runtime (C, SIMD, CUDA, ORT, TVM) reads.

Conventions (the spec, not an implementation detail):
- A word is a 64-bit little-endian unsigned integer (numpy '<u8').
- Bit j of a row (j = column along the reduction axis K of the PyTorch weight flattened to
  (N, d)) is bit (j % 64) of word (j // 64), LSB first. So a kernel walks K word by word and
  a popcount over a word covers 64 consecutive columns.
- Every row is padded to a multiple of 64 bits with ZERO bits; padding is corrected for by a
  constant in the kernels, never by garbage. A row buffer has shape (N, W), W = ceil(d / 64).
- A bit-plane buffer for b-bit fields has shape (b, N, W): plane p holds bit p of each field
  (bit-serial layout: a kernel does one popcount pass per plane and weights it by 2^p).
- A row stream (the "*_rows" layouts) holds the N rows of d bits back to back: bit j of row r
  is bit i = r*d + j of the stream, i.e. bit (i % 64) of word (i // 64), LSB first; only the
  end of the whole stream is padded, with ZERO bits, to a whole word. A row-stream buffer has
  shape (S,), S = ceil(N*d / 64), and a bit-plane row stream (b, S). For d a multiple of 64 its
  bytes are those of the padded (N, W) buffer.
- A field stream (used by the "offset" layout) stores field i in bits [i*b, (i+1)*b) of a
  little-endian bit stream, i.e. 8/b fields per byte, lowest field in the lowest bits.

All functions are vectorised numpy (np.packbits with bitorder="little"); no loops over weights.
"""

from __future__ import annotations

import numpy as np

WORD_BITS = 64
WORD = np.dtype("<u8")


def words_for(d: int) -> int:
    """Number of 64-bit words that hold d bits (W = ceil(d / 64))."""
    return -(-int(d) // WORD_BITS)


def pack_bits(bits: np.ndarray) -> np.ndarray:
    """Pack a boolean array (..., d) along its last axis into '<u8' words (..., ceil(d/64))."""
    bits = np.asarray(bits, dtype=bool)
    d = bits.shape[-1]
    W = words_for(d)
    if W == 0:
        return np.zeros(bits.shape[:-1] + (0,), dtype=WORD)
    padded = np.zeros(bits.shape[:-1] + (W * WORD_BITS,), dtype=bool)
    padded[..., :d] = bits
    packed = np.packbits(padded, axis=-1, bitorder="little")  # (..., W*8) bytes
    return np.ascontiguousarray(packed).view(WORD).reshape(bits.shape[:-1] + (W,))


def unpack_bits(words: np.ndarray, d: int) -> np.ndarray:
    """Inverse of pack_bits: '<u8' words (..., W) -> bool (..., d); padding bits are dropped."""
    if words.shape[-1] == 0:
        return np.zeros(words.shape[:-1] + (int(d),), dtype=bool)
    raw = np.ascontiguousarray(words, dtype=WORD).view(np.uint8)
    return np.unpackbits(raw, axis=-1, count=int(d), bitorder="little").astype(bool)


def padding_is_zero(words: np.ndarray, d: int) -> bool:
    """True when every bit at column >= d of every row is zero (the padding invariant)."""
    W = words.shape[-1]
    if W * WORD_BITS == d or words.size == 0:
        return True
    raw = np.ascontiguousarray(words, dtype=WORD).view(np.uint8)
    allbits = np.unpackbits(raw, axis=-1, bitorder="little")
    return not allbits[..., int(d):].any()


def pack_rows(bits: np.ndarray) -> np.ndarray:
    """Pack a boolean array (..., N, d) into row streams (..., ceil(N*d/64)): rows back to back."""
    bits = np.asarray(bits, dtype=bool)
    return pack_bits(bits.reshape(bits.shape[:-2] + (bits.shape[-2] * bits.shape[-1],)))


def unpack_rows(words: np.ndarray, n: int, d: int) -> np.ndarray:
    """Inverse of pack_rows: row streams (..., S) -> bool (..., n, d); end padding is dropped."""
    flat = unpack_bits(words, int(n) * int(d))
    return flat.reshape(flat.shape[:-1] + (int(n), int(d)))


def pack_planes(values: np.ndarray, b: int) -> np.ndarray:
    """Unsigned fields (N, d), each < 2^b -> bit planes (b, N, W); plane p = bit p of each field."""
    v = np.asarray(values).astype(np.uint16)
    shifts = np.arange(b, dtype=np.uint16).reshape((b,) + (1,) * v.ndim)
    return pack_bits(((v[None] >> shifts) & 1).astype(bool))


def unpack_planes(planes: np.ndarray, d: int) -> np.ndarray:
    """Inverse of pack_planes: (b, N, W) -> uint16 fields (N, d)."""
    bits = unpack_bits(planes, d).astype(np.uint16)  # (b, N, d)
    shifts = np.arange(bits.shape[0], dtype=np.uint16).reshape((-1,) + (1,) * (bits.ndim - 1))
    return (bits << shifts).sum(axis=0, dtype=np.uint16)


def pack_planes_rows(values: np.ndarray, b: int) -> np.ndarray:
    """Unsigned fields (N, d), each < 2^b -> bit-plane row streams (b, ceil(N*d/64))."""
    v = np.asarray(values).astype(np.uint16)
    shifts = np.arange(b, dtype=np.uint16).reshape((b,) + (1,) * v.ndim)
    return pack_rows(((v[None] >> shifts) & 1).astype(bool))


def unpack_planes_rows(planes: np.ndarray, n: int, d: int) -> np.ndarray:
    """Inverse of pack_planes_rows: (b, S) -> uint16 fields (n, d)."""
    bits = unpack_rows(planes, n, d).astype(np.uint16)  # (b, n, d)
    shifts = np.arange(bits.shape[0], dtype=np.uint16).reshape((-1, 1, 1))
    return (bits << shifts).sum(axis=0, dtype=np.uint16)


def pack_fields(values: np.ndarray, b: int) -> np.ndarray:
    """Unsigned fields (N, n) -> bytes (N, n*b/8): field i in bits [i*b, (i+1)*b), little-endian.

    n*b must be a multiple of 8 (callers pad rows to 64 fields first).
    """
    v = np.asarray(values).astype(np.uint16)
    if (v.shape[-1] * b) % 8:
        raise ValueError(f"{v.shape[-1]} fields of {b} bits do not fill whole bytes")
    bits = ((v[..., None] >> np.arange(b, dtype=np.uint16)) & 1).astype(bool)  # (N, n, b)
    flat = bits.reshape(v.shape[:-1] + (v.shape[-1] * b,))
    return np.packbits(flat, axis=-1, bitorder="little")


def unpack_fields(data: np.ndarray, b: int) -> np.ndarray:
    """Inverse of pack_fields: bytes (N, m) -> uint16 fields (N, m*8/b)."""
    bits = np.unpackbits(np.asarray(data, dtype=np.uint8), axis=-1, bitorder="little")
    bits = bits.reshape(bits.shape[:-1] + (bits.shape[-1] // b, b)).astype(np.uint16)
    return (bits << np.arange(b, dtype=np.uint16)).sum(axis=-1, dtype=np.uint16)
