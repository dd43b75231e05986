"""The .spfq file: a safetensors file whose metadata carries the spfq layer table.

Why safetensors: a plain, mmap-able, 8-byte-aligned tensor store that every runtime can read
without Python pickles. The spfq part lives in the string metadata:
    {"format": "spfq", "format_version": "1" or "2", "spfq": json.dumps(table),
     "spfq_sha256": sha256 of that JSON text (so a damaged conv stride or scale meta is caught too)}
Format versions: 1 is the original format (padded layouts only); 2 adds the *_rows layouts
(rows back to back, layouts.py). A file is written as the lowest version that holds its layouts
(`Layout.since`), so a file with padded layouts only is still version 1, byte for byte what
version-1 writers wrote, while one with a *_rows layout is version 2, which a version-1 reader
refuses as "written by a newer spfq-deploy" instead of meeting a layout name it does not know.
Version 3 adds group-wise scales: a layer entry with "group_size": G (a positive integer; only
present when the layer has groups) stores scale (and lam) as float16 (N, ceil(d / G)), one per
(row, group of G consecutive input columns). Only files with such a layer are version 3; files
without groups keep their version and bytes.
Readers take every version up to FORMAT_VERSION and refuse a layout newer than the file's version.
table = {"layers": {name: {kind, weight_shape, alphabet, bits, layout, conv, meta,
                           tensors: {role: key}, storage_report}},
         "float_params": [names], "model_spec", "meta",
         "sha256": {tensor key: hex digest of the tensor's raw little-endian bytes}}
Layouts may add entries to a layer (sparse: row_nnz, the nonzeros per row).
Tensor keys: layer/<name>/<role> (layout buffers, see layouts.py), layer/<name>/scale and
layer/<name>/lam (float16: the compressor's scales are float16 values, so this is exact),
layer/<name>/bias (float32), float/<name> (float params in their own dtype).

Reading never returns wrong weights: from a small read of the file head, the length prefix,
truncation, format, version, the table checksum, the table's schema and every buffer's dtype and
shape are checked before any tensor data is touched (read_header stops there); load() then maps
the tensors with safetensors and verifies every checksum. Every problem is a one-line
FormatError naming the file.
Writing is atomic (temp file in the same directory, fsync, os.replace) and deterministic: the
same model gives the same bytes (sorted JSON keys; the layer order is kept).
"""

from __future__ import annotations

import hashlib
import json
import math
import os
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError, safe_open
from safetensors import numpy as st_numpy

from .. import atomic
from ..compressed import ALPHABETS, CompressedLayer, CompressedModel, levels_for
from ..errors import FormatError
from . import layouts as L

FORMAT = "spfq"
FORMAT_VERSION = 3  # the newest version this code reads and writes (see file_version)
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header
MAX_DIM = 2 ** 31 - 1  # rows and columns (prod of the other dims) are int32 in the kernel ABI
KINDS = {"linear": 2, "conv1d": 3, "conv2d": 4}  # kind -> dims of the PyTorch weight
ST_NUMPY = {"BOOL": np.dtype(bool), "U8": np.dtype("u1"), "I8": np.dtype("i1"), "U16": np.dtype("<u2"),
            "I16": np.dtype("<i2"), "F16": np.dtype("<f2"), "U32": np.dtype("<u4"), "I32": np.dtype("<i4"),
            "F32": np.dtype("<f4"), "U64": np.dtype("<u8"), "I64": np.dtype("<i8"), "F64": np.dtype("<f8")}
ST_NAME = {v: k for k, v in ST_NUMPY.items()}
ST_BYTES = {k: v.itemsize for k, v in ST_NUMPY.items()}
ROW_ROLES = {"scale": np.float16, "lam": np.float16, "bias": np.float32}  # per-row vectors (N,)
GROUP_ROLES = ("scale", "lam")  # (N, ngroups) in a layer with group_size
GROUPS_SINCE = 3  # the format version that added group_size
REPORT_INTS = ("code_bits", "mask_bits", "scale_bits", "padding_bits", "total_bits", "weights",
               "bias_bytes")


# ---------------------------------------------------------------- helpers

def _le(a: np.ndarray) -> np.ndarray:
    """Contiguous little-endian copy (what safetensors stores and what sha256 covers)."""
    a = np.asarray(a)
    return np.asarray(a, dtype=a.dtype.newbyteorder("<"), order="C")  # keeps 0-d shapes


def _digest(a: np.ndarray) -> str:
    return hashlib.sha256(_le(a).tobytes()).hexdigest()


def _json_default(o: Any):
    if isinstance(o, np.generic):
        return o.item()
    if isinstance(o, np.ndarray):
        return o.tolist()
    if isinstance(o, Path):
        return str(o)
    raise TypeError(f"{type(o).__name__} is not JSON-serialisable")


def _as_float16(name: str, what: str, a: np.ndarray, shape: tuple) -> np.ndarray:
    a = np.asarray(a)
    if a.shape != shape:
        raise ValueError(f"{name}: {what} must have shape {shape}, got {a.shape}")
    h = a.astype(np.float16)
    if not np.array_equal(h.astype(a.dtype), a, equal_nan=True):
        raise ValueError(f"{name}: {what} values are not float16-representable")
    return h


# ---------------------------------------------------------------- writing

def _sorted(o):
    if isinstance(o, dict):
        return {k: _sorted(o[k]) for k in sorted(o)}
    if isinstance(o, list):
        return [_sorted(v) for v in o]
    return o


def _canonical_text(table: dict) -> str:
    """The table as JSON with every object's keys sorted, except the layers, which keep the
    model's order (load returns them in it): no dict built from a set can change the bytes."""
    try:
        plain = json.loads(json.dumps(table, default=_json_default))
    except (TypeError, ValueError) as e:
        raise ValueError(f"model metadata cannot be stored: {e}") from e
    out = {}
    for k in sorted(plain):
        out[k] = {n: _sorted(e) for n, e in plain[k].items()} if k == "layers" else _sorted(plain[k])
    return json.dumps(out)


def file_version(layouts) -> int:
    """The format version a file with these layouts is written as: the newest `since` among them
    (1 for padded layouts only, so such files stay readable by version-1 readers)."""
    return max((L.get_layout(name).since for name in layouts), default=1)


def _build(model: CompressedModel, layouts: dict[str, str] | None):
    """Tensors and metadata of a model; raises ValueError on anything that would not round-trip."""
    layouts = dict(layouts or {})
    unknown = set(layouts) - set(model.layers)
    if unknown:
        raise ValueError(f"layouts given for unknown layers: {', '.join(sorted(unknown))}")
    tensors: dict[str, np.ndarray] = {}
    table_layers = {}
    for name, layer in model.layers.items():
        layer.validate()
        layout = layouts.get(name) or L.storage_layout(layer)
        keys = {}
        for role, buf in L.pack_layer(layer, layout).items():
            keys[role] = f"layer/{name}/{role}"
            tensors[keys[role]] = buf
        per = (layer.rows, layer.ngroups) if layer.group_size else (layer.rows,)
        keys["scale"] = f"layer/{name}/scale"
        tensors[keys["scale"]] = _as_float16(name, "scale", layer.scale, per)
        if layer.lam is not None:
            keys["lam"] = f"layer/{name}/lam"
            tensors[keys["lam"]] = _as_float16(name, "lam", layer.lam, per)
        if layer.bias is not None:
            bias = np.asarray(layer.bias)
            if bias.shape != (layer.rows,):
                raise ValueError(f"{name}: bias must have shape ({layer.rows},)")
            keys["bias"] = f"layer/{name}/bias"
            tensors[keys["bias"]] = bias.astype(np.float32)
        table_layers[name] = {
            "kind": layer.kind, "weight_shape": [int(s) for s in layer.weight_shape],
            "alphabet": layer.alphabet, "bits": int(layer.bits), "layout": layout,
            "conv": layer.conv, "meta": layer.meta, "tensors": keys,
            "storage_report": L.storage_report(layer, layout), **L.table_fields(layer, layout),
        }
        if layer.group_size:
            table_layers[name]["group_size"] = int(layer.group_size)
    for name, value in model.float_params.items():
        tensors[f"float/{name}"] = np.asarray(value)
    tensors = {k: _le(v) for k, v in tensors.items()}
    table = {"layers": table_layers, "float_params": list(model.float_params),
             "model_spec": model.model_spec, "meta": model.meta,
             "sha256": {k: _digest(v) for k, v in tensors.items()}}
    text = _canonical_text(table)
    version = file_version(e["layout"] for e in table_layers.values())
    if any("group_size" in e for e in table_layers.values()):
        version = max(version, GROUPS_SINCE)
    try:
        _check_table(json.loads(text), {k: (_st_name(k, v.dtype), v.shape) for k, v in tensors.items()}, version)
    except ValueError as e:
        raise ValueError(f"model cannot be stored: {e}") from None  # load() would refuse it
    metadata = {"format": FORMAT, "format_version": str(version), "spfq": text,
                "spfq_sha256": hashlib.sha256(text.encode()).hexdigest()}
    return tensors, metadata, json.loads(text)


def _st_name(key: str, dtype: np.dtype) -> str:
    for name, np_type in ST_NUMPY.items():
        if np.dtype(dtype) == np_type:
            return name
    raise ValueError(f"tensor {key} has dtype {dtype}, which a .spfq file cannot hold")


def _serialise(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    """safetensors' bytes with its JSON header rewritten canonically (sorted keys, compact, padded
    with spaces to 8 bytes as safetensors pads): it writes the metadata map in a random order."""
    raw = st_numpy.save(tensors, metadata=metadata)
    n = int.from_bytes(raw[:8], "little")
    header = json.dumps(json.loads(raw[8:8 + n]), sort_keys=True, separators=(",", ":"),
                        ensure_ascii=False).encode()
    header += b" " * (-len(header) % 8)
    return len(header).to_bytes(8, "little") + header + raw[8 + n:]


def save(path: str | os.PathLike, model: CompressedModel,
         layouts: dict[str, str] | None = None) -> dict:
    """Write model to path atomically; layouts maps layer name -> layout name (default per layer).

    Returns the stored table. ValueError for a model that cannot be stored exactly,
    FormatError when the file cannot be written.
    """
    path = Path(path)
    tensors, metadata, table = _build(model, layouts)
    data = _serialise(tensors, metadata)
    try:
        atomic.write_bytes(path, data)
    except OSError as e:
        raise FormatError(f"{path}: cannot write: {e.strerror or e}") from e
    return table


# ---------------------------------------------------------------- reading: the file head

def _fail(path: Path, problem: str) -> FormatError:
    return FormatError(f"{path}: {problem}")


def _read_head(path: Path) -> tuple[bytes, int]:
    """(JSON header bytes, file size) from the first 8 + n bytes only: a huge or sparse file
    costs no more than its header (at most MAX_HEADER_BYTES)."""
    try:
        with open(path, "rb") as f:
            size = os.fstat(f.fileno()).st_size
            prefix = f.read(8)
            if len(prefix) < 8:
                raise _fail(path, f"truncated or not a .spfq file ({size} bytes)")
            n = int.from_bytes(prefix, "little")
            if n < 2 or n > MAX_HEADER_BYTES:
                raise _fail(path, "not a .spfq file")
            first = f.read(1)
            if first not in (b"{", b""):
                raise _fail(path, "not a .spfq file")
            if 8 + n > size:
                raise _fail(path, f"truncated: header needs {8 + n} bytes, file has {size}")
            text = first + f.read(n - 1)
    except FileNotFoundError:
        raise _fail(path, "no such file") from None
    except IsADirectoryError:
        raise _fail(path, "is a directory, not a .spfq file") from None
    except OSError as e:
        raise _fail(path, f"cannot read: {e.strerror or e}") from None
    if len(text) < n:
        raise _fail(path, f"truncated: header needs {8 + n} bytes, file has {8 + len(text)}")
    return text, size


def _what(v) -> str:
    if v is None:
        return "null"
    return {dict: "an object", list: "a list", str: "a string", bool: "a boolean",
            int: "a number", float: "a number"}.get(type(v), type(v).__name__)


def _is_int(v) -> bool:
    return isinstance(v, int) and not isinstance(v, bool)


def _is_num(v) -> bool:
    return isinstance(v, (int, float)) and not isinstance(v, bool)


def _tensor_entries(path: Path, header: dict, n: int, size: int) -> dict[str, tuple[str, tuple]]:
    """{key: (dtype, shape)} after the size checks safetensors would make on open, so that
    read_header refuses what load() would: offsets match dtype x shape, tile the data region."""
    entries, spans = {}, []
    for key, v in header.items():
        if key == "__metadata__":
            continue
        ok = isinstance(v, dict) and isinstance(v.get("dtype"), str) and isinstance(v.get("shape"), list) \
            and isinstance(v.get("data_offsets"), list) and len(v["data_offsets"]) == 2
        if not ok:
            raise _fail(path, f"malformed safetensors header: tensor {key} needs dtype, shape, data_offsets")
        dtype, shape, (begin, end) = v["dtype"], v["shape"], v["data_offsets"]
        if dtype not in ST_BYTES:
            raise _fail(path, f"malformed safetensors header: tensor {key} has unsupported dtype {dtype!r}")
        if not all(_is_int(s) and s >= 0 for s in shape):
            raise _fail(path, f"malformed safetensors header: tensor {key} has shape {shape}")
        if not (_is_int(begin) and _is_int(end) and 0 <= begin <= end) \
                or end - begin != math.prod(shape) * ST_BYTES[dtype]:
            raise _fail(path, f"malformed safetensors header: tensor {key} data_offsets {v['data_offsets']} "
                              f"do not hold {dtype} {shape}")
        entries[key] = (dtype, tuple(shape))
        spans.append((begin, end, key))
    spans.sort()
    data_bytes = size - 8 - n
    end = max((stop for _, stop, _ in spans), default=0)
    if end > data_bytes:
        raise _fail(path, f"truncated: data needs {8 + n + end} bytes, file has {size}")
    at = 0
    for begin, stop, key in spans:
        if begin != at:
            raise _fail(path, f"malformed safetensors header: tensor {key} starts at {begin}, "
                              f"expected {at} (tensors overlap or leave a gap)")
        at = stop
    if at != data_bytes:
        raise _fail(path, f"trailing data: {data_bytes - at} bytes after the last tensor")
    return entries


def _parse(path: Path, text: bytes, size: int) -> tuple[dict, dict, int]:
    """(tensor entries, spfq table, format version) after every check that needs no tensor data."""
    try:
        header = json.loads(text)
        meta = header.get("__metadata__") or {}
    except (ValueError, AttributeError, RecursionError):
        raise _fail(path, "not a .spfq file") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _fail(path, "not a .spfq file")
    try:
        version = int(meta.get("format_version", ""))
    except (TypeError, ValueError):
        raise _fail(path, f"bad format version {meta.get('format_version')!r}") from None
    if version > FORMAT_VERSION:
        raise _fail(path, f"written by a newer spfq-deploy: format version {version}, "
                          f"this version reads up to {FORMAT_VERSION}")
    if version < 1:
        raise _fail(path, f"bad format version {version}")
    odd = [k for k, v in meta.items() if not isinstance(v, str)]
    if odd:
        raise _fail(path, f"malformed safetensors header: metadata value {odd[0]!r} is not a string")
    entries = _tensor_entries(path, header, len(text), size)
    table_text = meta.get("spfq", "")
    if hashlib.sha256(table_text.encode()).hexdigest() != meta.get("spfq_sha256"):
        raise _fail(path, "corrupt: checksum mismatch in the layer table")
    try:
        table = json.loads(table_text)
    except (ValueError, RecursionError) as e:
        raise _fail(path, f"malformed spfq table ({e})") from None
    try:
        _check_table(table, entries, version)
    except ValueError as e:
        raise _fail(path, f"malformed spfq table: {e}".replace("\n", " ")) from None
    return entries, table, version


# ---------------------------------------------------------------- reading: the table schema

def _check_table(table, entries: dict, version: int) -> None:
    """ValueError naming the field (and layer) of the first table entry a reader cannot use."""
    if not isinstance(table, dict):
        raise ValueError(f"the table is {_what(table)}, not an object")
    digests = table.get("sha256")
    if not isinstance(digests, dict):
        raise ValueError(f"sha256 is {_what(digests)}, not an object")
    for key, digest in digests.items():
        if not (isinstance(digest, str) and len(digest) == 64 and all(c in "0123456789abcdef" for c in digest)):
            raise ValueError(f"sha256 of {key} is not a sha256 hex digest")
        if key not in entries:
            raise ValueError(f"missing tensor {key}")
    layers = table.get("layers")
    if not isinstance(layers, dict):
        raise ValueError(f"layers is {_what(layers)}, not an object")
    params = table.get("float_params", [])
    if not isinstance(params, list) or not all(isinstance(p, str) for p in params):
        raise ValueError("float_params must be a list of names")
    for p in params:
        _check_key(f"float/{p}", entries, digests)
    if table.get("model_spec") is not None and not isinstance(table["model_spec"], str):
        raise ValueError(f"model_spec is {_what(table['model_spec'])}, not a string")
    meta = table.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise ValueError(f"meta is {_what(meta)}, not an object")
    pairs = (meta or {}).get("folded_batchnorm", [])
    if not isinstance(pairs, list) or not all(
            isinstance(p, list) and len(p) == 2 and all(isinstance(n, str) for n in p) for p in pairs):
        raise ValueError("meta folded_batchnorm must be a list of [layer, batchnorm] name pairs")
    for name, entry in layers.items():
        _check_layer(name, entry, entries, digests, version)


def _check_key(key, entries: dict, digests: dict) -> None:
    if key not in entries:
        raise ValueError(f"missing tensor {key}")
    if key not in digests:
        raise ValueError(f"tensor {key} has no checksum in the table")


def _check_layer(name: str, e, entries: dict, digests: dict, version: int) -> None:
    def bad(problem: str) -> ValueError:
        return ValueError(f"layer {name}: {problem}")

    if not isinstance(e, dict):
        raise bad(f"entry is {_what(e)}, not an object")
    for field in ("kind", "weight_shape", "alphabet", "bits", "layout", "tensors", "storage_report"):
        if field not in e:
            raise bad(f"{field} is missing")
    kind, shape = e["kind"], e["weight_shape"]
    if not isinstance(kind, str) or kind not in KINDS:
        raise bad(f"kind {kind!r} is not one of {', '.join(KINDS)}")
    if not isinstance(shape, list) or len(shape) != KINDS[kind] or not all(_is_int(s) and s >= 1 for s in shape):
        raise bad(f"weight_shape {shape!r}: a {kind} weight has {KINDS[kind]} positive integer dims")
    N, d = shape[0], math.prod(shape[1:])
    if N > MAX_DIM or d > MAX_DIM:
        raise bad(f"weight_shape {shape!r} is too large ({N} rows x {d} columns; at most {MAX_DIM} each)")
    alphabet, bits = e["alphabet"], e["bits"]
    if not isinstance(alphabet, str) or alphabet not in ALPHABETS:
        raise bad(f"alphabet {alphabet!r} is not one of {', '.join(ALPHABETS)}")
    allowed_bits = {"binary": range(1, 2), "ternary": range(2, 3), "int": range(2, 9)}[alphabet]
    if not _is_int(bits) or bits not in allowed_bits:
        shown = allowed_bits[0] if len(allowed_bits) == 1 else f"{allowed_bits[0]}..{allowed_bits[-1]}"
        raise bad(f"bits {bits!r} is not valid for the {alphabet} alphabet ({shown})")
    layout = e["layout"]
    if not isinstance(layout, str) or layout not in L.LAYOUTS:
        raise bad(f"layout {layout!r} is not one of {', '.join(L.LAYOUTS)}")
    if L.get_layout(layout).since > version:
        raise bad(f"layout {layout!r} needs format version {L.get_layout(layout).since}, the file says {version}")
    _check_conv(bad, kind, shape, e.get("conv"))
    meta = e.get("meta")
    if meta is not None and not isinstance(meta, dict):
        raise bad(f"meta is {_what(meta)}, not an object")
    for key in ("sparsity", "sparsity_target"):
        v = (meta or {}).get(key)
        if v is not None and not (_is_num(v) and 0 <= v <= 1):
            raise bad(f"meta {key} {v!r} is not a fraction in [0, 1]")
    lay = L.get_layout(layout)
    extra = sorted(set(e) - {"kind", "weight_shape", "alphabet", "bits", "layout", "conv", "meta", "tensors",
                             "storage_report", "group_size"} - set(lay.table_keys))
    if extra:
        raise bad(f"{extra[0]} does not belong to a {layout} layer")
    keys = e["tensors"]
    if not isinstance(keys, dict):
        raise bad(f"tensors is {_what(keys)}, not an object")
    need, allowed = set(lay.roles) | {"scale"}, set(lay.roles) | set(ROW_ROLES)
    missing = sorted(need - set(keys))
    if missing:
        raise bad(f"tensors has no {missing[0]} buffer")
    for role, key in keys.items():
        if role not in allowed:
            raise bad(f"tensors role {role!r} is not one of {', '.join(sorted(allowed))}")
        if not isinstance(key, str):
            raise bad(f"tensors {role} is {_what(key)}, not a tensor name")
        try:
            _check_key(key, entries, digests)
        except ValueError as err:
            raise bad(f"tensors {role}: {err}") from None
    if "lam" in keys and levels_for(alphabet, bits) == 1:
        raise bad("tensors lam is only for multi-level int layers (K > 1); K = 1 uses scale")
    info = {"weight_shape": shape, "alphabet": alphabet, "bits": bits,
            **{k: e[k] for k in lay.table_keys if k in e}}
    try:
        specs = L.buffer_specs(layout, info)
    except ValueError as err:
        raise bad(str(err)) from None
    per_row = {role: (N,) for role in ROW_ROLES}
    if "group_size" in e:
        group = e["group_size"]
        if version < GROUPS_SINCE:
            raise bad(f"group_size needs format version {GROUPS_SINCE}, the file says {version}")
        if not _is_int(group) or group < 1:
            raise bad(f"group_size {group!r} is not a positive integer")
        per_row.update({role: (N, -(-d // group)) for role in GROUP_ROLES})
    specs.update({role: (np.dtype(dtype), per_row[role]) for role, dtype in ROW_ROLES.items() if role in keys})
    for role, (dtype, want) in specs.items():
        have_dtype, have = entries[keys[role]]
        if have_dtype != ST_NAME[np.dtype(dtype)] or len(have) != len(want) or any(
                w is not None and h != w for h, w in zip(have, want)):
            shown = [("*" if w is None else w) for w in want]
            raise bad(f"buffer {role!r} is {have_dtype} {list(have)} but weight_shape {shape} "
                      f"({bits}-bit {layout}) needs {ST_NAME[np.dtype(dtype)]} {shown}".replace("'*'", "*"))
    _check_report(bad, e["storage_report"], layout, N * d)


def _check_conv(bad, kind: str, shape: list, conv) -> None:
    """stride, padding, dilation, groups as exporters read them; kernel_size may be absent
    (older files: load fills it in from weight_shape)."""
    if kind == "linear":
        if conv is not None:
            raise bad(f"conv is {_what(conv)}: a linear layer has none (null)")
        return
    if not isinstance(conv, dict):
        raise bad(f"conv is {_what(conv)}: a {kind} layer needs an object with stride, padding, "
                  "dilation, groups, kernel_size")
    spatial = len(shape) - 2
    for key, low in (("stride", 1), ("padding", 0), ("dilation", 1), ("kernel_size", 1)):
        v = conv.get(key, shape[2:] if key == "kernel_size" else None)
        if not isinstance(v, list) or len(v) != spatial or not all(_is_int(x) and x >= low for x in v):
            raise bad(f"conv {key} {v!r}: needs {spatial} integers >= {low}")
    if conv.get("kernel_size", shape[2:]) != shape[2:]:
        raise bad(f"conv kernel_size {conv['kernel_size']} does not match weight_shape {shape}")
    g = conv.get("groups")
    if not _is_int(g) or g < 1 or shape[0] % g:
        raise bad(f"conv groups {g!r}: needs a positive integer dividing the {shape[0]} output channels")


def _check_report(bad, report, layout: str, weights: int) -> None:
    if not isinstance(report, dict):
        raise bad(f"storage_report is {_what(report)}, not an object")
    for key in REPORT_INTS:
        if not (_is_int(report.get(key)) and report[key] >= 0):
            raise bad(f"storage_report {key} {report.get(key)!r} is not a count")
    bpw = report.get("bits_per_weight")
    if report.get("layout") != layout or report["weights"] != weights or not _is_num(bpw) \
            or not math.isclose(bpw, report["total_bits"] / weights, rel_tol=1e-9):
        raise bad(f"storage_report does not describe this layer ({weights} weights, layout {layout}, "
                  f"bits_per_weight = total_bits / weights)")


# ---------------------------------------------------------------- reading: header and tensors

def _read(path: Path) -> tuple[dict, dict, int, int]:
    text, size = _read_head(path)
    entries, table, version = _parse(path, text, size)
    return entries, table, version, size


def read_header(path: str | os.PathLike) -> dict:
    """The layer table (shapes, layouts, storage reports, checksums) without reading tensor data.

    Adds "format_version", "file_bytes" and "tensors" ({key: {dtype, shape}}) for `inspect`.
    Every check that needs no data is made (so it refuses what load() would refuse for the
    table); checksums are verified by load(), not here.
    """
    path = Path(path)
    entries, table, version, size = _read(path)
    table = dict(table)
    table["format_version"] = version
    table["file_bytes"] = size
    table["tensors"] = {k: {"dtype": dtype, "shape": list(shape)} for k, (dtype, shape) in entries.items()}
    return table


def load(path: str | os.PathLike) -> CompressedModel:
    """Read and verify a .spfq file; codes come back exactly as saved.

    Tensors are read through safetensors' memory map one at a time, each checked against its
    sha256 before use; every checksum in the table is verified.
    """
    path = Path(path)
    _, table, _, _ = _read(path)
    digests = table["sha256"]
    try:
        with safe_open(str(path), framework="numpy") as f:
            verified = set()

            def tensor(key: str) -> np.ndarray:
                a = f.get_tensor(key)
                if key not in verified:
                    if _digest(a) != digests[key]:
                        raise _fail(path, f"corrupt: checksum mismatch in tensor {key}")
                    verified.add(key)
                return a

            layers = {name: _layer(path, name, entry, tensor) for name, entry in table["layers"].items()}
            float_params = {name: tensor(f"float/{name}") for name in table.get("float_params", [])}
            for key in digests:
                if key not in verified:
                    tensor(key)
    except SafetensorError as e:
        raise _fail(path, f"corrupt safetensors data ({e})".replace("\n", " ")) from None
    except OSError as e:
        raise _fail(path, f"cannot read: {e.strerror or e}") from None
    return CompressedModel(layers=layers, float_params=float_params,
                           model_spec=table.get("model_spec"), meta=table.get("meta") or {})


def _conv(entry: dict) -> dict | None:
    conv = entry.get("conv")
    if conv is None or "kernel_size" in conv:
        return conv
    return {**conv, "kernel_size": list(entry["weight_shape"][2:])}  # exporters read it


def _layer(path: Path, name: str, entry: dict, tensor) -> CompressedLayer:
    """A layer from its (schema-checked) table entry; buffer problems are FormatErrors."""
    keys = entry["tensors"]
    layout = L.get_layout(entry["layout"])
    try:
        codes = L.unpack_layer(layout.name, {r: tensor(keys[r]) for r in layout.roles}, entry)
        layer = CompressedLayer(
            name=name, kind=entry["kind"], weight_shape=tuple(entry["weight_shape"]),
            alphabet=entry["alphabet"], bits=entry["bits"], codes=codes,
            scale=tensor(keys["scale"]).astype(np.float32),
            lam=tensor(keys["lam"]).astype(np.float32) if "lam" in keys else None,
            bias=tensor(keys["bias"]).astype(np.float32) if "bias" in keys else None,
            conv=_conv(entry), meta=dict(entry.get("meta") or {}), group_size=int(entry.get("group_size", 0)))
        layer.validate()
    except ValueError as e:
        raise _fail(path, f"layer {name}: {str(e).removeprefix(f'{name}: ')}".replace("\n", " ")) from None
    return layer
