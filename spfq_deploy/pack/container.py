"""The .spfq file: a safetensors file whose metadata carries the spfq layer table.

Why safetensors: a plain, mmap-able, 8-byte-aligned tensor store that every runtime can read
without Python pickles. The spfq part lives in the string metadata:
    {"format": "spfq", "format_version": "1", "spfq": json.dumps(table),
     "spfq_sha256": sha256 of that JSON text (so a damaged conv stride or scale meta is caught too)}
table = {"layers": {name: {kind, weight_shape, alphabet, bits, layout, conv, meta,
                           tensors: {role: key}, storage_report}},
         "float_params": [names], "model_spec", "meta",
         "sha256": {tensor key: hex digest of the tensor's raw little-endian bytes}}
Layouts may add entries to a layer (sparse: row_nnz, the nonzeros per row).
Tensor keys: layer/<name>/<role> (layout buffers, see layouts.py), layer/<name>/scale and
layer/<name>/lam (float16: the compressor's scales are float16 values, so this is exact),
layer/<name>/bias (float32), float/<name> (float params in their own dtype).

Reading never returns wrong weights: length sanity, truncation, format, version, checksums and
buffer shapes are all checked, and every problem is a one-line FormatError naming the file.
Writing is atomic: temp file in the same directory, fsync, os.replace.
"""

from __future__ import annotations

import hashlib
import json
import os
from pathlib import Path
from typing import Any

import numpy as np
from safetensors import SafetensorError
from safetensors import numpy as st_numpy

from .. import atomic
from ..compressed import CompressedLayer, CompressedModel
from ..errors import FormatError
from . import layouts as L

FORMAT = "spfq"
FORMAT_VERSION = 1
MAX_HEADER_BYTES = 100_000_000  # safetensors' own limit on the JSON header


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


def _as_float16(name: str, what: str, a: np.ndarray, rows: int) -> np.ndarray:
    a = np.asarray(a)
    if a.shape != (rows,):
        raise ValueError(f"{name}: {what} must have shape ({rows},), got {a.shape}")
    h = a.astype(np.float16)
    if not np.array_equal(h.astype(a.dtype), a, equal_nan=True):
        raise ValueError(f"{name}: {what} values are not float16-representable")
    return h


# ---------------------------------------------------------------- writing

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
        layout = layouts.get(name) or L.default_layout(layer)
        keys = {}
        for role, buf in L.pack_layer(layer, layout).items():
            keys[role] = f"layer/{name}/{role}"
            tensors[keys[role]] = buf
        keys["scale"] = f"layer/{name}/scale"
        tensors[keys["scale"]] = _as_float16(name, "scale", layer.scale, layer.rows)
        if layer.lam is not None:
            keys["lam"] = f"layer/{name}/lam"
            tensors[keys["lam"]] = _as_float16(name, "lam", layer.lam, layer.rows)
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
    for name, value in model.float_params.items():
        tensors[f"float/{name}"] = np.asarray(value)
    tensors = {k: _le(v) for k, v in tensors.items()}
    table = {"layers": table_layers, "float_params": list(model.float_params),
             "model_spec": model.model_spec, "meta": model.meta,
             "sha256": {k: _digest(v) for k, v in tensors.items()}}
    try:
        text = json.dumps(table, default=_json_default)
    except (TypeError, ValueError) as e:
        raise ValueError(f"model metadata cannot be stored: {e}") from e
    metadata = {"format": FORMAT, "format_version": str(FORMAT_VERSION), "spfq": text,
                "spfq_sha256": hashlib.sha256(text.encode()).hexdigest()}
    return tensors, metadata, json.loads(text)


def _serialise(tensors: dict[str, np.ndarray], metadata: dict[str, str]) -> bytes:
    return st_numpy.save(tensors, metadata=metadata)


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


# ---------------------------------------------------------------- reading

def _fail(path: Path, problem: str) -> FormatError:
    return FormatError(f"{path}: {problem}")


def _parse(path: Path, data: bytes) -> tuple[dict, dict, int]:
    """(safetensors header, spfq table, format version) after every check that needs no tensor."""
    size = len(data)
    if size < 8:
        raise _fail(path, f"truncated or not a .spfq file ({size} bytes)")
    n = int.from_bytes(data[:8], "little")
    if n < 2 or n > MAX_HEADER_BYTES:
        raise _fail(path, "not a .spfq file")
    if 8 + n > size:
        if data[8:9] == b"{":
            raise _fail(path, f"truncated: header needs {8 + n} bytes, file has {size}")
        raise _fail(path, "not a .spfq file")
    try:
        header = json.loads(data[8:8 + n])
        meta = header.get("__metadata__") or {}
    except (ValueError, AttributeError):
        raise _fail(path, "not a .spfq file") from None
    if not isinstance(meta, dict) or meta.get("format") != FORMAT:
        raise _fail(path, "not a .spfq file")
    try:
        version = int(meta.get("format_version", ""))
    except ValueError:
        raise _fail(path, f"bad format version {meta.get('format_version')!r}") from None
    if version > FORMAT_VERSION:
        raise _fail(path, f"written by a newer spfq-deploy: format version {version}, "
                          f"this version reads up to {FORMAT_VERSION}")
    if version < 1:
        raise _fail(path, f"bad format version {version}")
    try:
        end = max([int(v["data_offsets"][1]) for k, v in header.items() if k != "__metadata__"],
                  default=0)
    except (TypeError, KeyError, IndexError, ValueError):
        raise _fail(path, "malformed safetensors header") from None
    if 8 + n + end > size:
        raise _fail(path, f"truncated: data needs {8 + n + end} bytes, file has {size}")
    text = meta.get("spfq", "")
    if hashlib.sha256(text.encode()).hexdigest() != meta.get("spfq_sha256"):
        raise _fail(path, "corrupt: checksum mismatch in the layer table")
    try:
        table = json.loads(text)
        if not isinstance(table, dict) or not isinstance(table.get("layers"), dict) \
                or not isinstance(table.get("sha256"), dict):
            raise ValueError("missing layers or sha256")
    except ValueError as e:
        raise _fail(path, f"malformed spfq table ({e})") from None
    return header, table, version


def _read_bytes(path: Path) -> bytes:
    try:
        return path.read_bytes()
    except FileNotFoundError:
        raise _fail(path, "no such file") from None
    except IsADirectoryError:
        raise _fail(path, "is a directory, not a .spfq file") from None
    except OSError as e:
        raise _fail(path, f"cannot read: {e.strerror or e}") from None


def read_header(path: str | os.PathLike) -> dict:
    """The layer table (shapes, layouts, storage reports, checksums) without unpacking weights.

    Adds "format_version", "file_bytes" and "tensors" ({key: {dtype, shape}}) for `inspect`.
    Checksums are verified by load(), not here.
    """
    path = Path(path)
    data = _read_bytes(path)
    header, table, version = _parse(path, data)
    table = dict(table)
    table["format_version"] = version
    table["file_bytes"] = len(data)
    table["tensors"] = {k: {"dtype": v.get("dtype"), "shape": v.get("shape")}
                        for k, v in header.items() if k != "__metadata__"}
    return table


def load(path: str | os.PathLike) -> CompressedModel:
    """Read and verify a .spfq file; codes come back exactly as saved."""
    path = Path(path)
    data = _read_bytes(path)
    _, table, _ = _parse(path, data)
    try:
        tensors = st_numpy.load(data)
    except SafetensorError as e:
        raise _fail(path, f"corrupt safetensors data ({e})") from None
    digests = table["sha256"]
    for key, want in digests.items():
        if key not in tensors:
            raise _fail(path, f"missing tensor {key}")
        if _digest(tensors[key]) != want:
            raise _fail(path, f"corrupt: checksum mismatch in tensor {key}")

    def tensor(key: str) -> np.ndarray:
        if key not in digests:
            raise _fail(path, f"tensor {key} has no checksum in the table")
        return tensors[key]

    try:
        layers = {name: _layer(name, entry, tensor) for name, entry in table["layers"].items()}
        float_params = {name: tensor(f"float/{name}") for name in table.get("float_params", [])}
    except (ValueError, KeyError, TypeError) as e:
        msg = f"missing {e}" if isinstance(e, KeyError) else str(e)
        raise _fail(path, f"malformed spfq table: {msg}".replace("\n", " ")) from None
    return CompressedModel(layers=layers, float_params=float_params,
                           model_spec=table.get("model_spec"), meta=table.get("meta") or {})


def _layer(name: str, entry: dict, tensor) -> CompressedLayer:
    keys = entry["tensors"]
    layout = L.get_layout(entry["layout"])
    try:
        codes = L.unpack_layer(layout.name, {r: tensor(keys[r]) for r in layout.roles}, entry)
    except ValueError as e:
        raise ValueError(f"layer {name}: {e}") from None
    rows = int(entry["weight_shape"][0])

    def row_vector(role: str, dtype) -> np.ndarray | None:
        if role not in keys:
            return None
        a = tensor(keys[role])
        if a.dtype != dtype or a.shape != (rows,):
            raise ValueError(f"layer {name}: {role} is {a.dtype} {a.shape}, "
                             f"expected {np.dtype(dtype)} ({rows},)")
        return a.astype(np.float32)

    layer = CompressedLayer(
        name=name, kind=entry["kind"], weight_shape=tuple(int(s) for s in entry["weight_shape"]),
        alphabet=entry["alphabet"], bits=int(entry["bits"]), codes=codes,
        scale=row_vector("scale", np.float16), lam=row_vector("lam", np.float16),
        bias=row_vector("bias", np.float32), conv=entry.get("conv"), meta=entry.get("meta") or {})
    if layer.scale is None:
        raise ValueError(f"layer {name}: no scale tensor")
    layer.validate()
    return layer
