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
from spfq_deploy.pack import container, load, read_header, save
from spfq_deploy.pack import layouts as L

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


# ---------------------------------------------------------------- (6) huge and sparse files

PROBE = textwrap.dedent('''
    import resource, sys, time
    from spfq_deploy.errors import FormatError
    from spfq_deploy.pack import container
    vm = [int(l.split()[1]) * 1024 for l in open("/proc/self/status") if l.startswith("VmSize")][0]
    limit = vm + 1024 ** 3  # 1 GiB more address space than the imports took
    resource.setrlimit(resource.RLIMIT_AS, (limit, limit))
    fn = getattr(container, sys.argv[1])
    t0 = time.perf_counter()
    try:
        fn(sys.argv[2])
    except FormatError as e:
        print(f"{time.perf_counter() - t0:.3f} {e}")
        sys.exit(0)
    print("no error")
    sys.exit(1)
''')


def probe(fn: str, path: Path) -> str:
    """Run container.<fn>(path) in a child whose address space is capped 1 GiB above its imports
    (so a whole-file read fails at once instead of filling this machine's memory)."""
    r = subprocess.run([sys.executable, "-c", PROBE, fn, str(path)], capture_output=True, text=True,
                       timeout=120, cwd=ROOT, check=False)
    assert r.returncode == 0, (r.stdout + r.stderr)[-2000:]
    lines = r.stdout.strip().splitlines()
    assert len(lines) == 1 and not r.stderr.strip(), r.stdout + r.stderr
    seconds, msg = lines[0].split(" ", 1)
    assert float(seconds) < 5, msg
    assert str(path) in msg
    return msg


def sparse_file(path: Path, head: bytes = b"", size: int = 30 * GiB) -> Path:
    with open(path, "wb") as f:
        f.write(head)
    os.truncate(path, size)
    return path


def test_huge_sparse_file_is_one_line_error(tmp_path):
    path = sparse_file(tmp_path / "x.spfq")  # truncate -s 30G: zero length prefix
    for fn in ("read_header", "load"):
        assert "not a .spfq file" in probe(fn, path)


def test_length_prefix_then_nothing(tmp_path):
    path = tmp_path / "p.spfq"
    path.write_bytes((4096).to_bytes(8, "little"))
    expect_format_error(load, path, "truncated")
    expect_format_error(read_header, path, "truncated")
    big = sparse_file(tmp_path / "q.spfq", (99_999_992).to_bytes(8, "little"))  # a ~100 MB "header" of zeros
    assert "not a .spfq file" in probe("load", big)


@pytest.mark.parametrize("claim", ["beyond the file", "inside the file"])
def test_huge_data_offsets_claim(saved, tmp_path, claim):
    """A real header whose one tensor claims 48 GiB (file: 30 GiB) or 24 GiB (file: that, sparse)."""
    header, _ = read_parts(saved)
    key = "layer/fc.sign/sign"
    nbytes = (48 if claim == "beyond the file" else 24) * GiB
    header = {"__metadata__": header["__metadata__"],
              key: {"dtype": "U64", "shape": [nbytes // 8], "data_offsets": [0, nbytes]}}
    text = json.dumps(header).encode()
    text += b" " * (-len(text) % 8)
    head = len(text).to_bytes(8, "little") + text
    path = sparse_file(tmp_path / "h.spfq", head, 30 * GiB if claim == "beyond the file" else len(head) + nbytes)
    for fn in ("read_header", "load"):
        msg = probe(fn, path)
        # inside: safetensors-valid, but the table names tensors this header lacks
        assert ("truncated" if claim == "beyond the file" else "missing tensor") in msg, msg


def test_trailing_bytes_are_refused(saved):
    with open(saved, "ab") as f:
        f.write(b"\0" * 64)
    expect_format_error(read_header, saved, "trailing")
    expect_format_error(load, saved, "trailing")


class CountingFile:
    """A file object that records the furthest byte read."""

    def __init__(self, f, seen):
        self._f, self._seen = f, seen

    def read(self, *a):
        out = self._f.read(*a)
        self._seen.append(self._f.tell())
        return out

    def __getattr__(self, name):
        return getattr(self._f, name)

    def __enter__(self):
        return self

    def __exit__(self, *exc):
        self._f.close()


def test_read_header_reads_no_tensor_data(saved, monkeypatch):
    seen = []
    real_open = open

    def counting_open(p, mode="r", *a, **k):
        return CountingFile(real_open(p, mode, *a, **k), seen)

    def boom(*a, **k):
        raise AssertionError("read_header must not touch the tensor data")

    monkeypatch.setattr(container, "open", counting_open, raising=False)
    monkeypatch.setattr(container, "safe_open", boom, raising=False)
    monkeypatch.setattr(container.st_numpy, "load", boom)
    monkeypatch.setattr(container.np, "memmap", boom)
    monkeypatch.setattr(Path, "read_bytes", boom)
    h = read_header(saved)
    monkeypatch.undo()
    n = int.from_bytes(saved.read_bytes()[:8], "little")
    assert seen and max(seen) <= 8 + n < saved.stat().st_size
    assert h["file_bytes"] == saved.stat().st_size
    assert h["tensors"]["layer/fc.sign/sign"] == {"dtype": "U64", "shape": [5]}  # sign_rows: 4 x 65 bits


def test_load_still_verifies_checksums(saved):
    header, body = read_parts(saved)
    b, e = header["layer/fc.sparse/kept"]["data_offsets"]
    body = bytearray(body)
    body[(b + e) // 2] ^= 1
    write_parts(saved, header, bytes(body))
    read_header(saved)  # the table is intact
    expect_format_error(load, saved, "checksum", "layer/fc.sparse/kept")


# ---------------------------------------------------------------- (7) crafted tables, valid table sha

def set_layer(name, field, value):
    def edit(t):
        t["layers"][name][field] = value
    return edit


def drop_layer_field(name, field):
    def edit(t):
        del t["layers"][name][field]
    return edit


def set_top(field, value):
    def edit(t):
        t[field] = value
    return edit


def set_tensor_role(name, role, key):
    def edit(t):
        t["layers"][name]["tensors"][role] = key
    return edit


CONV = {"stride": [1, 1], "padding": [1, 1], "dilation": [1, 1], "groups": 1, "kernel_size": [3, 3]}

LAYER_CASES = {
    "weight_shape empty": ("fc.sign", "weight_shape", set_layer("fc.sign", "weight_shape", [])),
    "weight_shape 10**30": ("fc.sign", "weight_shape", set_layer("fc.sign", "weight_shape", [16, 10 ** 30])),
    "weight_shape negative": ("fc.sign", "weight_shape", set_layer("fc.sign", "weight_shape", [4, -65])),
    "weight_shape zero": ("fc.sign", "weight_shape", set_layer("fc.sign", "weight_shape", [0, 65])),
    "weight_shape string": ("fc.sign", "weight_shape", set_layer("fc.sign", "weight_shape", [4, "65"])),
    "weight_shape bool": ("fc.sign", "weight_shape", set_layer("fc.sign", "weight_shape", [4, True])),
    "weight_shape not a list": ("fc.sign", "weight_shape", set_layer("fc.sign", "weight_shape", 65)),
    "dims do not match buffers": ("fc.sign", "fc.sign", set_layer("fc.sign", "weight_shape", [4, 200])),
    "rows do not match buffers": ("fc.offset", "fc.offset", set_layer("fc.offset", "weight_shape", [6, 9])),
    "conv dims do not match kind": ("conv.tern", "weight_shape", set_layer("conv.tern", "weight_shape", [8, 27])),
    "meta a list": ("fc.sign", "meta", set_layer("fc.sign", "meta", [1, 2])),
    "meta sparsity a string": ("fc.sparse", "sparsity", set_layer("fc.sparse", "meta", {"sparsity": "lots"})),
    "bits a string": ("fc.offset", "bits", set_layer("fc.offset", "bits", "4")),
    "bits out of range": ("fc.sparse", "bits", set_layer("fc.sparse", "bits", 9)),
    "bits of binary": ("fc.sign", "bits", set_layer("fc.sign", "bits", 3)),
    "conv a list": ("conv.tern", "conv", set_layer("conv.tern", "conv", [1, 1])),
    "conv groups zero": ("conv.tern", "groups", set_layer("conv.tern", "conv", {**CONV, "groups": 0})),
    "conv groups do not divide": ("conv.tern", "groups", set_layer("conv.tern", "conv", {**CONV, "groups": 3})),
    "conv stride string": ("conv.tern", "stride", set_layer("conv.tern", "conv", {**CONV, "stride": "1"})),
    "conv stride zero": ("conv.tern", "stride", set_layer("conv.tern", "conv", {**CONV, "stride": [0, 1]})),
    "conv padding short": ("conv.tern", "padding", set_layer("conv.tern", "conv", {**CONV, "padding": [1]})),
    "conv no groups": ("conv.tern", "groups",
                       set_layer("conv.tern", "conv", {k: v for k, v in CONV.items() if k != "groups"})),
    "conv kernel_size wrong": ("conv.tern", "kernel_size", set_layer("conv.tern", "conv", {**CONV, "kernel_size": [2, 2]})),
    "conv on a linear layer": ("fc.sign", "conv", set_layer("fc.sign", "conv", CONV)),
    "conv missing on a conv layer": ("conv.tern", "conv", set_layer("conv.tern", "conv", None)),
    "kind unknown": ("fc.sign", "kind", set_layer("fc.sign", "kind", "lstm")),
    "kind a list": ("fc.sign", "kind", set_layer("fc.sign", "kind", ["linear"])),
    "alphabet unknown": ("fc.sign", "alphabet", set_layer("fc.sign", "alphabet", "quaternary")),
    "layout unknown": ("fc.sign", "layout", set_layer("fc.sign", "layout", "nibbles")),
    "layout a number": ("fc.sign", "layout", set_layer("fc.sign", "layout", 3)),
    "offset layout at 3 bits": ("fc.offset", "offset", set_layer("fc.offset", "bits", 3)),
    "tensors a string": ("fc.sign", "tensors", set_layer("fc.sign", "tensors", "layer/fc.sign/sign")),
    "tensors without scale": ("fc.sign", "scale", set_layer("fc.sign", "tensors", {"sign": "layer/fc.sign/sign"})),
    "tensors unknown role": ("fc.sign", "extra", set_tensor_role("fc.sign", "extra", "layer/fc.sign/bias")),
    "tensors role not a string": ("fc.sign", "bias", set_tensor_role("fc.sign", "bias", 7)),
    "tensors key absent": ("fc.sign", "layer/fc.sign/nope", set_tensor_role("fc.sign", "bias", "layer/fc.sign/nope")),
    "lam on a binary layer": ("fc.sign", "lam", set_tensor_role("fc.sign", "lam", "layer/fc.sign/scale")),
    "scale of the wrong dtype": ("fc.sign", "scale", set_tensor_role("fc.sign", "scale", "layer/fc.sign/bias")),
    "bias of the wrong size": ("fc.sign", "bias", set_tensor_role("fc.sign", "bias", "layer/fc.sparse/bias")),
    "storage_report a number": ("fc.sign", "storage_report", set_layer("fc.sign", "storage_report", 5)),
    "storage_report missing": ("fc.sign", "storage_report", drop_layer_field("fc.sign", "storage_report")),
    "storage_report zero bits/weight": ("fc.sign", "storage_report", lambda t: t["layers"]["fc.sign"]["storage_report"].update(
        bits_per_weight=0)),
    "row_nnz short": ("fc.sparse", "row_nnz", lambda t: t["layers"]["fc.sparse"].update(
        row_nnz=t["layers"]["fc.sparse"]["row_nnz"][:-1])),
    "row_nnz above d": ("fc.sparse", "row_nnz", lambda t: t["layers"]["fc.sparse"]["row_nnz"].__setitem__(0, 131)),
    "row_nnz on a dense layout": ("fc.sign", "row_nnz", set_layer("fc.sign", "row_nnz", [1, 1, 1, 1])),
    "kept words disagree with row_nnz": ("fc.sparse", "kept", lambda t: t["layers"]["fc.sparse"].update(
        row_nnz=[100] + t["layers"]["fc.sparse"]["row_nnz"][1:])),
    "entry a list": ("fc.sign", "entry", set_top("layers", {"fc.sign": [1, 2]})),
    "kind missing": ("fc.sign", "kind", drop_layer_field("fc.sign", "kind")),
}

TOP_CASES = {
    "layers a list": ("layers", set_top("layers", [])),
    "meta a list": ("meta", set_top("meta", [1, 2])),
    "folded_batchnorm garbage": ("folded_batchnorm", set_top("meta", {"folded_batchnorm": [[1]]})),
    "float_params a string": ("float_params", set_top("float_params", "bn.weight")),
    "float_params unknown": ("float/nope", set_top("float_params", ["bn.weight", "emb", "nope"])),
    "model_spec a number": ("model_spec", set_top("model_spec", 5)),
    "sha256 a list": ("sha256", set_top("sha256", [])),
    "sha256 digest a number": ("sha256", lambda t: t["sha256"].update({"layer/fc.sign/sign": 5})),
    "sha256 of an absent tensor": ("layer/x/y", lambda t: t["sha256"].update({"layer/x/y": "0" * 64})),
    "table a list": ("table", None),
}


@pytest.mark.parametrize("case", LAYER_CASES)
def test_crafted_layer_table_is_refused(saved, case):
    layer, word, edit = LAYER_CASES[case]
    rewrite_table(saved, edit)
    for fn in (read_header, load):
        expect_format_error(fn, saved, layer, word)


@pytest.mark.parametrize("case", TOP_CASES)
def test_crafted_top_table_is_refused(saved, case):
    word, edit = TOP_CASES[case]
    if case == "table a list":
        header, body = read_parts(saved)
        header["__metadata__"]["spfq"] = "[1, 2]"
        header["__metadata__"]["spfq_sha256"] = hashlib.sha256(b"[1, 2]").hexdigest()
        write_parts(saved, header, body)
    else:
        rewrite_table(saved, edit)
    for fn in (read_header, load):
        expect_format_error(fn, saved, word)


def test_crafted_safetensors_entries_are_refused(saved):
    cases = {
        "dtype": lambda h: h["layer/fc.sign/sign"].update(dtype="U65"),
        "shape": lambda h: h["layer/fc.sign/sign"].update(shape=[4, -2]),
        "data_offsets": lambda h: h["layer/fc.sign/sign"].update(data_offsets=[0, 10 ** 30]),
        "overlap": lambda h: h["layer/fc.sign/bias"].update(data_offsets=h["layer/fc.sign/sign"]["data_offsets"][:1]
                                                           + [h["layer/fc.sign/sign"]["data_offsets"][0] + 16]),
        "metadata": lambda h: h["__metadata__"].update(extra=5),
    }
    original = saved.read_bytes()
    for edit in cases.values():
        header, body = read_parts(saved)
        edit(header)
        write_parts(saved, header, body)
        for fn in (read_header, load):
            expect_format_error(fn, saved)
        saved.write_bytes(original)
    load(saved)


def test_conv_without_kernel_size_gets_it_from_weight_shape(saved):
    rewrite_table(saved, set_layer("conv.tern", "conv", {k: v for k, v in CONV.items() if k != "kernel_size"}))
    assert load(saved).layers["conv.tern"].conv == CONV


def test_save_refuses_what_load_would(tmp_path):
    model = make_model()
    model.layers["conv.tern"].conv = {**CONV, "groups": 3}
    with pytest.raises(ValueError, match="conv.tern.*groups"):
        save(tmp_path / "m.spfq", model)
    model = make_model()
    model.meta = {"folded_batchnorm": [["conv"]]}
    with pytest.raises(ValueError, match="folded_batchnorm"):
        save(tmp_path / "m.spfq", model)
    assert not (tmp_path / "m.spfq").exists()


def test_valid_file_still_reads(saved):
    assert L.table_fields(make_model().layers["fc.sparse"], "sparse").keys() == {"row_nnz"}
    h = read_header(saved)
    assert h["layers"]["fc.sparse"]["row_nnz"] == (make_model().layers["fc.sparse"].codes != 0).sum(1).tolist()
    m = load(saved)
    ref = make_model()
    for name, la in ref.layers.items():
        np.testing.assert_array_equal(m.layers[name].codes, la.codes)
        assert m.layers[name].meta == la.meta and m.layers[name].conv == la.conv
    assert list(m.layers) == list(ref.layers) and m.meta == ref.meta


# ---------------------------------------------------------------- (8) same model, same bytes

SAVE_SCRIPT = textwrap.dedent('''
    import sys
    sys.path.insert(0, sys.argv[2])
    from test_bad_input_pack import LAYOUTS, make_model
    from spfq_deploy.pack import save
    save(sys.argv[1], make_model(), layouts=LAYOUTS)
''')


def test_save_is_byte_identical_across_processes(tmp_path):
    digests = set()
    for seed in ("0", "1", "2", "3"):
        out = tmp_path / f"m{seed}.spfq"
        env = {**os.environ, "PYTHONHASHSEED": seed}
        subprocess.run([sys.executable, "-c", SAVE_SCRIPT, str(out), str(Path(__file__).parent)],
                       check=True, env=env, cwd=ROOT, timeout=120)
        digests.add(hashlib.sha256(out.read_bytes()).hexdigest())
    assert len(digests) == 1
    n = int.from_bytes(out.read_bytes()[:8], "little")
    assert n % 8 == 0
    header = json.loads(out.read_bytes()[8:8 + n])
    assert list(header["__metadata__"]) == sorted(header["__metadata__"])
    assert set(st_numpy.load_file(str(out))) == set(header) - {"__metadata__"}
    load(out)


def test_save_twice_in_one_process_same_bytes(tmp_path):
    files = [tmp_path / f"{i}.spfq" for i in range(6)]
    for f in files:
        save(f, make_model(), layouts=LAYOUTS)
    assert len({f.read_bytes() for f in files}) == 1


TINY = textwrap.dedent('''
    import torch
    from torch import nn

    def build():
        torch.manual_seed(0)
        return nn.Sequential(nn.Conv2d(1, 8, 3, padding=1), nn.BatchNorm2d(8), nn.ReLU(), nn.Flatten(),
                             nn.Linear(8 * 6 * 6, 16), nn.ReLU(), nn.Linear(16, 4)).eval()

    def calibration():
        g = torch.Generator().manual_seed(1)
        return torch.randn(64, 1, 6, 6, generator=g)
''')


def test_compress_twice_same_sha256(tmp_path):
    (tmp_path / "tiny.py").write_text(TINY)
    digests = set()
    for seed in ("0", "1"):
        out = tmp_path / f"t{seed}.spfq"
        env = {**os.environ, "PYTHONHASHSEED": seed, "OMP_NUM_THREADS": "1"}
        subprocess.run([sys.executable, "-m", "spfq_deploy.cli", "compress", str(tmp_path / "tiny.py"),
                        "--bits", "4", "--sparsity", "0.5", "--method", "spfq", "--seed", "7", "-q",
                        "-o", str(out)], check=True, env=env, cwd=ROOT, timeout=300, capture_output=True)
        digests.add(hashlib.sha256(out.read_bytes()).hexdigest())
    assert len(digests) == 1


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
