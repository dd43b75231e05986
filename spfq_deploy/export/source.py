"""What every export backend starts from: the compressed model rebuilt from a .spfq file, the
inputs to trace it with, and the sha256 table of the files a manifest lists.

Loaded once per `spfq-deploy export` call (export/job.py) and handed to each backend.
"""

from __future__ import annotations

import hashlib
import inspect
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..compressed import CompressedModel
from ..errors import SpfqError
from ..modelspec import load_model
from ..pack import container
from ..reference import apply_compressed


@dataclass
class ExportInputs:
    """Example inputs and the graph's names/axes (a model file's `export_inputs()` gives these)."""

    args: tuple
    input_names: list[str]
    output_names: list[str]
    dynamic_axes: dict = field(default_factory=dict)


@dataclass
class Source:
    """A .spfq file with the model it compresses: what the backends export."""

    path: Path
    cm: CompressedModel
    spec: str  # the model factory, path.py:function
    model: nn.Module  # the reference: the factory's model with the dequantised weights applied
    inputs: ExportInputs
    generation: dict | None = None  # decoders: the model file's generation_config() (generate.py)


def default_inputs(calibration, n: int = 2) -> ExportInputs:
    """First rows of the first calibration batch, batch axis dynamic."""
    batch = calibration[0] if isinstance(calibration, (list, tuple)) and not torch.is_tensor(calibration) \
        else calibration
    if isinstance(batch, (list, tuple)):
        args = tuple(torch.as_tensor(a)[:n] for a in batch)
    else:
        args = (torch.as_tensor(batch)[:n],)
    names = ["input"] if len(args) == 1 else [f"input_{i}" for i in range(len(args))]
    axes = {name: {0: "batch"} for name in names}
    axes["output"] = {0: "batch"}
    return ExportInputs(args, names, ["output"], axes)


def export_inputs(module, model_file_calibration, model: nn.Module | None = None) -> ExportInputs:
    """The model file's export_inputs() if it has one, else the first calibration rows. An
    export_inputs(model) that takes an argument gets the factory's model (a decoder's cache has
    one key and value per layer of the model actually built)."""
    fn = getattr(module, "export_inputs", None)
    if fn is not None:
        try:
            takes_model = bool(inspect.signature(fn).parameters)
            spec = fn(model) if takes_model else fn()
            return ExportInputs(tuple(spec["args"]), list(spec["input_names"]), list(spec["output_names"]),
                                dict(spec.get("dynamic_axes", {})))
        except SpfqError:
            raise
        except Exception as exc:
            raise SpfqError(f"the model file's export_inputs() failed or returned something unusable "
                            f"({type(exc).__name__}: {str(exc).strip()[:200]})") from None
    if model_file_calibration is None:
        raise SpfqError("the model file has neither export_inputs() nor calibration(): cannot trace it")
    return default_inputs(model_file_calibration())


def load_source(spfq_path: str | Path, model_spec: str | None = None) -> Source:
    """The .spfq file, its model factory's model with the compressed weights, and trace inputs."""
    spfq_path = Path(spfq_path)
    cm = container.load(spfq_path)
    spec = model_spec or cm.model_spec
    if not spec:
        raise SpfqError(f"{spfq_path}: no model factory recorded; pass --model path.py:factory")
    model, module = load_model(spec)
    apply_compressed(model, cm, str(spfq_path))
    return Source(spfq_path, cm, spec, model, export_inputs(module, getattr(module, "calibration", None), model),
                  generation_config(module))


def generation_config(module) -> dict | None:
    """The model file's generation_config() (decoders: token ids and tokenizer.json text), checked."""
    fn = getattr(module, "generation_config", None)
    if fn is None:
        return None
    try:
        cfg = dict(fn())
        out = {"bos_token_id": int(cfg["bos_token_id"]), "eos_token_ids": [int(t) for t in cfg["eos_token_ids"]],
               "tokenizer_json": str(cfg["tokenizer_json"])}
    except SpfqError:
        raise
    except Exception as exc:
        raise SpfqError(f"the model file's generation_config() failed or returned something unusable "
                        f"({type(exc).__name__}: {str(exc).strip()[:200]})") from None
    return out


def file_sha256(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def file_table(folder: Path, files: list[str] | None = None) -> dict:
    """{relative path: {sha256, bytes}} of `files` (default: every file below folder), for manifests."""
    paths = [folder / f for f in files] if files is not None else [q for q in folder.rglob("*") if q.is_file()]
    return {str(p.relative_to(folder)): {"sha256": file_sha256(p), "bytes": p.stat().st_size}
            for p in sorted(paths)}
