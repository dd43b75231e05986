"""What every export starts from and ends with: the compressed model rebuilt from a .spfq file
with the inputs to trace it with, and the sha256 table of the files written."""

from __future__ import annotations

import hashlib
from pathlib import Path

from ..errors import SpfqError
from ..modelspec import load_model
from ..pack import container
from ..reference import apply_compressed
from . import capture as cap


def export_inputs(module, model_file_calibration) -> cap.ExportInputs:
    """The model file's export_inputs() if it has one, else the first calibration rows."""
    fn = getattr(module, "export_inputs", None)
    if fn is not None:
        spec = fn()
        return cap.ExportInputs(tuple(spec["args"]), list(spec["input_names"]), list(spec["output_names"]),
                                dict(spec.get("dynamic_axes", {})))
    if model_file_calibration is None:
        raise SpfqError("the model file has neither export_inputs() nor calibration(): cannot trace it")
    return cap.default_inputs(model_file_calibration())


def load_source(spfq_path: Path, model_spec: str | None):
    """(CompressedModel, model spec, reference nn.Module, ExportInputs) of a .spfq file."""
    cm = container.load(spfq_path)
    spec = model_spec or cm.model_spec
    if not spec:
        raise SpfqError(f"{spfq_path}: no model factory recorded; pass --model path.py:factory")
    model, module = load_model(spec)
    apply_compressed(model, cm, str(spfq_path))
    return cm, spec, model, export_inputs(module, getattr(module, "calibration", None))


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_table(folder: Path) -> dict:
    """{relative path: {sha256, bytes}} of every file below folder, for manifests."""
    return {str(p.relative_to(folder)): {"sha256": file_sha256(p), "bytes": p.stat().st_size}
            for p in sorted(q for q in folder.rglob("*") if q.is_file())}
