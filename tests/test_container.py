"""The .spfq container: exact round trip, header without unpacking, and clear errors for
truncated, corrupt, newer, foreign files; atomic writes."""

import hashlib
import json
import os
from pathlib import Path

import numpy as np
import pytest
from safetensors import numpy as st_numpy

from spfq_deploy import atomic
from spfq_deploy.compressed import CompressedLayer, CompressedModel
from spfq_deploy.errors import FormatError
from spfq_deploy.pack import FORMAT_VERSION, container, load, read_header, save


def f16(a):
    return np.asarray(a, dtype=np.float32).astype(np.float16).astype(np.float32)


def layer(name, alphabet, bits, shape, rng, *, sparsity=0.0, lam=False, bias=True, kind="linear",
          conv=None):
    N, d = shape[0], int(np.prod(shape[1:]))
    K = 1 if alphabet in ("binary", "ternary") else 2 ** (bits - 1) - 1
    if alphabet == "binary":
        codes = rng.choice(np.array([-1, 1], np.int8), size=(N, d))
    else:
        codes = rng.integers(-K, K + 1, size=(N, d)).astype(np.int8)
    codes.flat[0], codes.flat[-1] = K, -K
    if sparsity:
        codes[rng.random((N, d)) < sparsity] = 0
    scale = f16(rng.random(N) + 0.1)
    return CompressedLayer(
        name=name, kind=kind, weight_shape=tuple(shape), alphabet=alphabet, bits=bits,
        codes=codes, scale=scale, lam=f16(scale * 3) if lam else None,
        bias=rng.standard_normal(N).astype(np.float32) if bias else None, conv=conv,
        meta={"method": "spfq", "C": 1.5, "seed": 7, "errors": [0.25, 0.125],
              **({"sparsity_target": sparsity} if sparsity else {})})


@pytest.fixture
def model():
    rng = np.random.default_rng(0)
    conv = {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1, "kernel_size": [3, 3]}
    layers = [
        layer("fc.sign", "binary", 1, (4, 65), rng),
        layer("fc.pruned_bin", "binary", 1, (3, 100), rng, sparsity=0.5, bias=False),
        layer("conv.tern", "ternary", 2, (8, 3, 3, 3), rng, kind="conv2d", conv=conv),
        layer("dw", "int", 3, (32, 1, 3, 3), rng, kind="conv2d",
              conv={**conv, "groups": 32}),
        layer("fc.offset", "int", 4, (5, 9), rng),
        layer("fc.sparse", "int", 5, (7, 130), rng, sparsity=0.6, lam=True),
        layer("fc.empty", "int", 4, (2, 10), rng, sparsity=1.0, lam=True, bias=False),
    ]
    layers[-1].codes[:] = 0
    return CompressedModel(
        layers={lay.name: lay for lay in layers},
        float_params={"bn.weight": rng.standard_normal(8).astype(np.float32),
                      "bn.num_batches_tracked": np.array(12, dtype=np.int64),
                      "emb": rng.standard_normal((3, 4)).astype(np.float64)},
        model_spec="models/net.py:build", meta={"seed": 0, "calib": 128})


LAYOUTS = {"fc.offset": "offset"}
# rows that are not whole 64-bit words get the *_rows twins (no per-row padding): version 2
EXPECTED_LAYOUT = {"fc.sign": "sign_rows", "fc.pruned_bin": "sign_mask_rows", "conv.tern": "sign_mask_rows",
                   "dw": "planes_rows", "fc.offset": "offset", "fc.sparse": "sparse",
                   "fc.empty": "sparse"}


@pytest.fixture
def saved(tmp_path, model):
    path = tmp_path / "m.spfq"
    save(path, model, layouts=LAYOUTS)
    return path


def assert_same(a: CompressedModel, b: CompressedModel):
    assert list(a.layers) == list(b.layers)
    for name, x in a.layers.items():
        y = b.layers[name]
        for attr in ("kind", "weight_shape", "alphabet", "bits"):
            assert getattr(y, attr) == getattr(x, attr)
        assert y.codes.dtype == np.int8
        np.testing.assert_array_equal(y.codes, x.codes)
        assert y.scale.dtype == np.float32
        np.testing.assert_array_equal(y.scale, x.scale)
        for attr in ("lam", "bias"):
            xv, yv = getattr(x, attr), getattr(y, attr)
            assert (xv is None) == (yv is None)
            if xv is not None:
                assert yv.dtype == np.float32
                np.testing.assert_array_equal(yv, xv)
        assert y.conv == x.conv and y.meta == x.meta
        np.testing.assert_array_equal(y.dequantize(), x.dequantize())
    assert list(a.float_params) == list(b.float_params)
    for name, v in a.float_params.items():
        assert b.float_params[name].dtype == v.dtype and b.float_params[name].shape == v.shape
        np.testing.assert_array_equal(b.float_params[name], v)
    assert a.model_spec == b.model_spec and a.meta == b.meta


# ---------------------------------------------------------------- round trip and header

def test_roundtrip_exact(saved, model):
    assert_same(model, load(saved))


def test_header_table(saved, model, monkeypatch):
    def boom(*a, **k):
        raise AssertionError("read_header must not unpack")
    monkeypatch.setattr(container.L, "unpack_layer", boom)
    monkeypatch.setattr(container.st_numpy, "load", boom)
    h = read_header(saved)
    assert h["format_version"] == 2 and FORMAT_VERSION == 3  # no groups: still version 2
    assert {n: e["layout"] for n, e in h["layers"].items()} == EXPECTED_LAYOUT
    e = h["layers"]["fc.sparse"]
    assert e["weight_shape"] == [7, 130] and e["alphabet"] == "int" and e["bits"] == 5
    assert e["tensors"] == {"mask": "layer/fc.sparse/mask", "kept": "layer/fc.sparse/kept",
                            "scale": "layer/fc.sparse/scale", "lam": "layer/fc.sparse/lam",
                            "bias": "layer/fc.sparse/bias"}
    assert e["storage_report"]["scale_bits"] == 2 * 16 * 7
    assert h["float_params"] == ["bn.weight", "bn.num_batches_tracked", "emb"]
    assert h["model_spec"] == "models/net.py:build" and h["meta"] == model.meta
    assert set(h["sha256"]) == set(h["tensors"])
    assert h["tensors"]["layer/fc.sign/scale"]["dtype"] == "F16"
    assert h["tensors"]["layer/fc.sign/sign"] == {"dtype": "U64", "shape": [5]}  # 4 x 65 bits back to back
    assert h["tensors"]["layer/fc.sign/bias"]["dtype"] == "F32"
    assert h["tensors"]["float/emb"]["dtype"] == "F64"


def test_metadata_keys(saved):
    with open(saved, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(n))["__metadata__"]
    assert set(meta) == {"format", "format_version", "spfq", "spfq_sha256"}
    assert hashlib.sha256(meta["spfq"].encode()).hexdigest() == meta["spfq_sha256"]
    assert meta["format"] == "spfq" and meta["format_version"] == "2"
    table = json.loads(meta["spfq"])
    tensors = st_numpy.load_file(str(saved))
    assert set(tensors) == set(table["sha256"])
    for key, digest in table["sha256"].items():
        raw = tensors[key].astype(tensors[key].dtype.newbyteorder("<")).tobytes()
        assert hashlib.sha256(raw).hexdigest() == digest


def test_save_rejects_non_float16_scale(tmp_path, model):
    model.layers["fc.sign"].scale = model.layers["fc.sign"].scale + np.float32(1e-4)
    with pytest.raises(ValueError, match="float16"):
        save(tmp_path / "m.spfq", model)
    assert os.listdir(tmp_path) == []


def test_save_rejects_bad_layout(tmp_path, model):
    with pytest.raises(ValueError, match="sign"):
        save(tmp_path / "m.spfq", model, layouts={"conv.tern": "sign"})
    with pytest.raises(ValueError, match="unknown"):
        save(tmp_path / "m.spfq", model, layouts={"nope": "sign"})
    assert os.listdir(tmp_path) == []


# ---------------------------------------------------------------- reading errors

def header_len(path):
    return int.from_bytes(path.read_bytes()[:8], "little")


def expect_error(path, *words):
    with pytest.raises(FormatError) as info:
        load(path)
    msg = str(info.value)
    assert "\n" not in msg and str(path) in msg
    for w in words:
        assert w in msg, msg
    return msg


def test_missing_file(tmp_path):
    expect_error(tmp_path / "absent.spfq", "no such file")
    with pytest.raises(FormatError):
        read_header(tmp_path / "absent.spfq")


@pytest.mark.parametrize("where", ["prefix", "header", "data", "last byte"])
def test_truncated(saved, where):
    data = saved.read_bytes()
    n = header_len(saved)
    cut = {"prefix": 5, "header": 8 + n // 2, "data": (8 + n + len(data)) // 2,
           "last byte": len(data) - 1}[where]
    saved.write_bytes(data[:cut])
    expect_error(saved, "truncated")
    with pytest.raises(FormatError, match="truncated"):
        read_header(saved)


def test_flipped_byte_in_buffer(saved):
    data = bytearray(saved.read_bytes())
    n = header_len(saved)
    header = json.loads(data[8:8 + n])
    for key in ("layer/fc.sparse/kept", "layer/fc.sign/sign", "layer/dw/scale"):
        start, end = header[key]["data_offsets"]
        corrupt = bytearray(data)
        corrupt[8 + n + (start + end) // 2] ^= 0x10
        saved.write_bytes(bytes(corrupt))
        expect_error(saved, "checksum", key)


def rewrite(path, edit_meta=None, drop=None, reseal=True):
    """Edit a saved file's metadata; reseal recomputes the table checksum (a deliberate edit)."""
    tensors = st_numpy.load_file(str(path))
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        meta = json.loads(f.read(n))["__metadata__"]
    if edit_meta:
        edit_meta(meta)
        if reseal:
            meta["spfq_sha256"] = hashlib.sha256(meta["spfq"].encode()).hexdigest()
    if drop:
        del tensors[drop]
    st_numpy.save_file(tensors, str(path), metadata=meta)


def test_newer_version(saved):
    rewrite(saved, lambda m: m.update(format_version=str(FORMAT_VERSION + 1)))
    msg = expect_error(saved, "newer", f"format version {FORMAT_VERSION + 1}", f"up to {FORMAT_VERSION}")
    with pytest.raises(FormatError, match="newer"):
        read_header(saved)
    assert "checksum" not in msg


def test_not_spfq(tmp_path):
    junk = tmp_path / "junk.bin"
    junk.write_bytes(np.random.default_rng(0).integers(0, 256, 4096, dtype=np.uint8).tobytes())
    expect_error(junk, "not a .spfq file")
    text = tmp_path / "notes.txt"
    text.write_text("{ this is just some text, long enough to have a length prefix }")
    expect_error(text, "not a .spfq file")
    plain = tmp_path / "plain.safetensors"
    st_numpy.save_file({"w": np.ones((2, 2), np.float32)}, str(plain))
    expect_error(plain, "not a .spfq file")
    other = tmp_path / "other.safetensors"
    st_numpy.save_file({"w": np.ones((2, 2), np.float32)}, str(other), metadata={"format": "pt"})
    expect_error(other, "not a .spfq file")
    with pytest.raises(FormatError, match="not a .spfq file"):
        read_header(plain)


def test_malformed_table(saved):
    rewrite(saved, lambda m: m.update(spfq=m["spfq"][:-10]))
    expect_error(saved, "malformed")


def test_missing_tensor(saved):
    rewrite(saved, drop="layer/fc.sparse/mask")
    expect_error(saved, "missing", "layer/fc.sparse/mask")


def test_damaged_table_is_caught(saved):
    """A flipped value in the JSON table (here a conv-like meta number) must not load silently."""
    def damage(m):
        t = json.loads(m["spfq"])
        t["layers"]["fc.sign"]["meta"]["C"] = 123.0
        m["spfq"] = json.dumps(t)
    rewrite(saved, damage, reseal=False)
    expect_error(saved, "checksum", "layer table")


def test_table_inconsistent_with_buffers(saved):
    def widen(m):
        t = json.loads(m["spfq"])
        t["layers"]["fc.sign"]["weight_shape"] = [4, 200]
        m["spfq"] = json.dumps(t)
    rewrite(saved, widen)
    expect_error(saved, "fc.sign")


# ---------------------------------------------------------------- format versions 1 and 2

V1_FILE = Path(__file__).parent / "data" / "format_v1.spfq"


def format_v1_model():
    """The model in tests/data/format_v1.spfq, written by the version-1 writer (commit b73165d,
    before the *_rows layouts): padded sign, planes, sign_mask, planes layers."""
    rng = np.random.default_rng(15)
    conv = {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1, "kernel_size": [3, 3]}

    def make(name, kind, shape, alphabet, bits, conv=None):
        N, d = shape[0], int(np.prod(shape[1:]))
        K = 1 if alphabet in ("binary", "ternary") else 2 ** (bits - 1) - 1
        if alphabet == "binary":
            codes = rng.choice(np.array([-1, 1], np.int8), size=(N, d))
        else:
            codes = rng.integers(-K, K + 1, size=(N, d)).astype(np.int8)
        scale = (rng.random(N) + 0.1).astype(np.float16).astype(np.float32)
        bias = rng.standard_normal(N).astype(np.float32)
        return CompressedLayer(name, kind, tuple(shape), alphabet, bits, codes, scale, bias=bias, conv=conv,
                               meta={"method": "rtn"})

    layers = [make("fc.sign", "linear", (4, 65), "binary", 1),
              make("dw", "conv2d", (8, 1, 3, 3), "int", 4, {**conv, "groups": 8}),
              make("conv.tern", "conv2d", (4, 3, 3, 3), "ternary", 2, conv),
              make("fc.planes", "linear", (3, 128), "int", 3)]
    return CompressedModel(layers={lay.name: lay for lay in layers},
                           float_params={"bn.weight": rng.standard_normal(4).astype(np.float32)},
                           model_spec="tests/format_v1", meta={"seed": 15})


V1_LAYOUTS = {"fc.sign": "sign", "dw": "planes", "conv.tern": "sign_mask", "fc.planes": "planes"}


def test_version_1_file_still_loads():
    h = read_header(V1_FILE)
    assert h["format_version"] == 1
    assert {n: e["layout"] for n, e in h["layers"].items()} == V1_LAYOUTS
    assert_same(format_v1_model(), load(V1_FILE))


def test_padded_layouts_still_write_version_1_byte_for_byte(tmp_path):
    path = tmp_path / "m.spfq"
    save(path, format_v1_model(), layouts=V1_LAYOUTS)
    assert path.read_bytes() == V1_FILE.read_bytes()


def test_rows_layouts_write_version_2(tmp_path):
    path = tmp_path / "m.spfq"
    table = save(path, format_v1_model())
    assert {n: e["layout"] for n, e in table["layers"].items()} == {
        "fc.sign": "sign_rows", "dw": "planes_rows", "conv.tern": "sign_mask_rows", "fc.planes": "planes"}
    with open(path, "rb") as f:
        n = int.from_bytes(f.read(8), "little")
        assert json.loads(f.read(n))["__metadata__"]["format_version"] == "2"
    h = read_header(path)
    assert h["format_version"] == 2
    assert h["tensors"]["layer/dw/planes"] == {"dtype": "U64", "shape": [4, 2]}  # 72 fields, 2 words a plane
    assert h["tensors"]["layer/conv.tern/mask"] == {"dtype": "U64", "shape": [2]}  # 108 fields
    assert_same(format_v1_model(), load(path))
    assert path.stat().st_size < V1_FILE.stat().st_size


def test_whole_word_rows_stay_version_1(tmp_path):
    rng = np.random.default_rng(1)
    m = CompressedModel(layers={"fc": layer("fc", "int", 4, (3, 128), rng),
                                "b": layer("b", "binary", 1, (2, 64), rng)}, float_params={})
    table = save(tmp_path / "m.spfq", m)
    assert {n: e["layout"] for n, e in table["layers"].items()} == {"fc": "planes", "b": "sign"}
    assert read_header(tmp_path / "m.spfq")["format_version"] == 1


def test_version_1_file_with_a_rows_layout_is_refused(saved):
    rewrite(saved, lambda m: m.update(format_version="1"))
    msg = expect_error(saved, "fc.sign", "layout 'sign_rows' needs format version 2", "says 1")
    assert "checksum" not in msg
    with pytest.raises(FormatError, match="needs format version 2"):
        read_header(saved)


# ---------------------------------------------------------------- atomic writes

def fail(*a, **k):
    raise RuntimeError("disk on fire")


@pytest.mark.parametrize("target", ["replace", "fsync", "serialise"])
def test_failed_save_leaves_nothing(tmp_path, model, monkeypatch, target):
    if target == "serialise":
        monkeypatch.setattr(container, "_serialise", fail)
    else:
        monkeypatch.setattr(atomic.os, target, fail)
    with pytest.raises(RuntimeError, match="disk on fire"):
        save(tmp_path / "m.spfq", model)
    assert os.listdir(tmp_path) == []


def test_failed_save_keeps_previous_file(saved, model, monkeypatch):
    before = saved.read_bytes()
    model.layers["fc.sign"].codes[:] = 1
    monkeypatch.setattr(atomic.os, "replace", fail)
    with pytest.raises(RuntimeError):
        save(saved, model)
    assert saved.read_bytes() == before
    assert os.listdir(saved.parent) == [saved.name]


def test_unwritable_target_is_format_error(tmp_path, model):
    with pytest.raises(FormatError, match="cannot write"):
        save(tmp_path / "no" / "such" / "dir" / "m.spfq", model)


def test_new_file_mode_follows_umask(tmp_path, model):
    old = os.umask(0o027)
    try:
        save(tmp_path / "m.spfq", model)
    finally:
        os.umask(old)
    assert (tmp_path / "m.spfq").stat().st_mode & 0o777 == 0o640  # not NamedTemporaryFile's 0600


def test_overwrite_keeps_mode(saved, model):
    os.chmod(saved, 0o604)
    model.layers["fc.sign"].codes[:] = -1
    save(saved, model)
    assert np.all(load(saved).layers["fc.sign"].codes == -1)
    assert os.listdir(saved.parent) == [saved.name]
    assert saved.stat().st_mode & 0o777 == 0o604
