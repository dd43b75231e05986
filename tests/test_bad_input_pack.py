"""Bad .spfq input (issue 12): huge or sparse files, crafted layer tables with a valid table
checksum, and sparse masks that disagree with their kept codes all give one FormatError line
(or a KernelError from the binding), quickly and with bounded memory; same model, same bytes."""

from __future__ import annotations

import hashlib
import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import numpy as np
import pytest
from safetensors import numpy as st_numpy

from spfq_deploy import kernels as K
from spfq_deploy.compressed import CompressedLayer, CompressedModel
from spfq_deploy.errors import FormatError
from spfq_deploy.pack import container, layouts as L, load, read_header, save

ROOT = Path(__file__).resolve().parents[1]
GiB = 2 ** 30


# ---------------------------------------------------------------- a real model and file

def f16(a):
    return np.asarray(a, dtype=np.float32).astype(np.float16).astype(np.float32)


def _layer(name, alphabet, bits, shape, rng, *, sparsity=0.0, lam=False, kind="linear", conv=None):
    N, d = shape[0], int(np.prod(shape[1:]))
    Kmax = 1 if alphabet in ("binary", "ternary") else 2 ** (bits - 1) - 1
    if alphabet == "binary":
        codes = rng.choice(np.array([-1, 1], np.int8), size=(N, d))
    else:
        codes = rng.integers(-Kmax, Kmax + 1, size=(N, d)).astype(np.int8)
    if sparsity:
        codes[rng.random((N, d)) < sparsity] = 0
    scale = f16(rng.random(N) + 0.1)
    return CompressedLayer(
        name=name, kind=kind, weight_shape=tuple(shape), alphabet=alphabet, bits=bits, codes=codes,
        scale=scale, lam=f16(scale * 3) if lam else None, bias=rng.standard_normal(N).astype(np.float32),
        conv=conv, meta={"method": "spfq", "C": 1.5, "seed": 7, "b": 1, "a": 2,
                         **({"sparsity_target": sparsity, "sparsity": sparsity} if sparsity else {})})


def make_model() -> CompressedModel:
    rng = np.random.default_rng(0)
    conv = {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1, "kernel_size": [3, 3]}
    layers = [
        _layer("fc.sign", "binary", 1, (4, 65), rng),
        _layer("conv.tern", "ternary", 2, (8, 3, 3, 3), rng, kind="conv2d", conv=conv),
        _layer("fc.offset", "int", 4, (5, 9), rng),
        _layer("fc.sparse", "int", 5, (7, 130), rng, sparsity=0.6, lam=True),
    ]
    return CompressedModel(
        layers={la.name: la for la in layers},
        float_params={"bn.weight": rng.standard_normal(8).astype(np.float32),
                      "emb": rng.standard_normal((3, 4)).astype(np.float64)},
        model_spec="models/net.py:build", meta={"seed": 0, "zeta": 1, "alpha": [3, 2, 1]})


LAYOUTS = {"fc.offset": "offset"}


@pytest.fixture
def saved(tmp_path):
    path = tmp_path / "m.spfq"
    save(path, make_model(), layouts=LAYOUTS)
    return path


def read_parts(path: Path) -> tuple[dict, bytes]:
    data = path.read_bytes()
    n = int.from_bytes(data[:8], "little")
    return json.loads(data[8:8 + n]), data[8 + n:]


def write_parts(path: Path, header: dict, body: bytes) -> None:
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    path.write_bytes(len(text).to_bytes(8, "little") + text + body)


def reseal(header: dict, table: dict) -> None:
    """Store table in the header with a valid table checksum (a deliberate, consistent edit)."""
    meta = header["__metadata__"]
    meta["spfq"] = json.dumps(table)
    meta["spfq_sha256"] = hashlib.sha256(meta["spfq"].encode()).hexdigest()


def rewrite_table(path: Path, edit) -> None:
    """Rewrite a real .spfq's layer table with edit(table) and recompute spfq_sha256."""
    header, body = read_parts(path)
    table = json.loads(header["__metadata__"]["spfq"])
    edit(table)
    reseal(header, table)
    write_parts(path, header, body)


NP = {"U64": "<u8", "U8": "u1", "F16": "<f2", "F32": "<f4", "F64": "<f8", "I64": "<i8"}


def rewrite_buffer(path: Path, key: str, edit, table_edit=None) -> None:
    """edit(array) one stored tensor in place and recompute its sha256 and the table checksum,
    so that only a check of the buffer's content can catch the change."""
    header, body = read_parts(path)
    e = header[key]
    b, end = e["data_offsets"]
    a = np.frombuffer(body[b:end], dtype=NP[e["dtype"]]).reshape(e["shape"]).copy()
    edit(a)
    body = body[:b] + a.tobytes() + body[end:]
    table = json.loads(header["__metadata__"]["spfq"])
    table["sha256"][key] = hashlib.sha256(a.tobytes()).hexdigest()
    if table_edit:
        table_edit(table)
    reseal(header, table)
    write_parts(path, header, body)


def expect_format_error(fn, path, *words):
    with pytest.raises(FormatError) as info:
        fn(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg, msg
    for w in words:
        assert w in msg, msg
    return msg


# ---------------------------------------------------------------- (9) sparse mask vs kept codes

def flip(row: int, col: int):
    def edit(mask):
        mask[row, col // 64] ^= np.uint64(1 << (col % 64))
    return edit


def zero_col(codes, row):
    return int(np.nonzero(codes[row] == 0)[0][0])


def last_nonzero_col(codes, row):
    return int(np.nonzero(codes[row])[0][-1])


@pytest.mark.parametrize("direction", ["set", "clear"])
def test_sparse_mask_bit_flip_rejected_at_load(saved, direction):
    codes = make_model().layers["fc.sparse"].codes
    row = 3
    col = zero_col(codes, row) if direction == "set" else last_nonzero_col(codes, row)
    rewrite_buffer(saved, "layer/fc.sparse/mask", flip(row, col))
    read_header(saved)  # the table is consistent: only the buffers disagree
    expect_format_error(load, saved, "fc.sparse", f"row {row}")


def test_sparse_mask_bit_flip_rejected_without_row_nnz(saved):
    """A file without row_nnz (written before it existed): what the buffers alone show."""
    codes = make_model().layers["fc.sparse"].codes
    nnz = (codes != 0).sum(1)
    rows = [r for r in range(codes.shape[0]) if nnz[r] < nnz.max()
            and codes[r, last_nonzero_col(codes, r)] != 1]  # its last kept field is nonzero
    row = rows[0]
    rewrite_buffer(saved, "layer/fc.sparse/mask", flip(row, last_nonzero_col(codes, row)),
                   lambda t: t["layers"]["fc.sparse"].pop("row_nnz", None))
    expect_format_error(load, saved, "fc.sparse", f"row {row}")


def test_unpack_sparse_names_row():
    rng = np.random.default_rng(3)
    layer = _layer("l", "int", 4, (6, 130), rng, sparsity=0.5, lam=True)
    bufs = L.pack_layer(layer, "sparse")
    info = {**L.layer_info(layer), "row_nnz": (layer.codes != 0).sum(axis=1).tolist()}
    np.testing.assert_array_equal(L.unpack_layer("sparse", bufs, info), layer.codes)
    mask = bufs["mask"].copy()
    flip(2, zero_col(layer.codes, 2))(mask)
    with pytest.raises(ValueError, match="row 2"):
        L.unpack_layer("sparse", {"mask": mask, "kept": bufs["kept"]}, info)


def capacity_layer():
    """Int layer whose row 0 has exactly 64 nonzeros (a full kept word), the others fewer."""
    rng = np.random.default_rng(5)
    layer = _layer("cap", "int", 4, (5, 130), rng, sparsity=0.7, lam=True)
    layer.codes[0] = 0
    layer.codes[0, :64] = rng.choice(np.array([-3, -2, 2, 3], np.int8), size=64)
    return layer


def packed_weights(layer, mask, kept):
    return K.PackedWeights("sparse", layer.rows, layer.cols, {"mask": mask, "kept": kept}, layer.scale,
                           layer.lam, layer.bias, L.field_bits(layer))


def test_kernels_reject_sparse_mask_bit_flip():
    layer = capacity_layer()
    bufs = L.pack_layer(layer, "sparse")
    assert bufs["kept"].shape[2] == 1
    x = np.random.default_rng(0).standard_normal((2, layer.cols)).astype(np.float32)
    ok = packed_weights(layer, bufs["mask"], bufs["kept"]).matmul_f32(x)
    np.testing.assert_allclose(ok, K.PackedWeights.from_layer(layer, "sparse").matmul_f32(x))

    more = bufs["mask"].copy()  # row 0: a 65th nonzero with no kept field to hold it
    flip(0, 100)(more)
    with pytest.raises(K.KernelError, match="row 0"):
        packed_weights(layer, more, bufs["kept"])

    nnz = (layer.codes != 0).sum(1)
    row = next(r for r in range(1, layer.rows) if layer.codes[r, last_nonzero_col(layer.codes, r)] != 1)
    fewer = bufs["mask"].copy()  # a kept code left over past the row's popcount
    flip(row, last_nonzero_col(layer.codes, row))(fewer)
    assert nnz[row] < 64
    with pytest.raises(K.KernelError, match=f"row {row}"):
        packed_weights(layer, fewer, bufs["kept"])

    pad = bufs["mask"].copy()  # a set mask bit in the padding (column >= K)
    pad[4, 2] |= np.uint64(1 << 10)
    with pytest.raises(K.KernelError, match="row 4"):
        packed_weights(layer, pad, bufs["kept"])
