"""`spfq-deploy export`: one job that loads the .spfq file, its model and the targets once, lets
each backend (onnx/, tvm/, cuda/) write into one staged folder, and commits that folder once.

Order matters for the user: everything that can fail fast (options, targets, the output folder,
compilers, nvcc) is checked before the slow work (tracing, compiling), and nothing appears at
the output path unless every backend finished. The output folder rules (folder.py) keep what
the user owns safe: --force replaces only an earlier export or an empty folder.
"""

from __future__ import annotations

import json
import os
import shutil
import sys
import time
import zipfile
from dataclasses import dataclass
from pathlib import Path
from typing import Callable

import numpy as np
import torch

from .. import __version__
from ..atomic import staged_directory
from ..errors import SpfqError
from ..kernels import INT8_QUANTIZER
from ..pack import container
from ..targets import Target, get_target, host_target, load_target_file
from . import folder
from .source import Source, file_table, load_source

FORMATS = ("onnx", "tvm")
SHARED_FILES = ("model.spfq", "inputs.npz")  # every manifest lists these, whichever backend wrote
GENERATION_FILES = ("generation.json", "tokenizer.json")  # decoders (generate.py) also share these


@dataclass
class ExportJob:
    """What every backend gets: the source, the CPU target (and the host's), the GPU target."""

    source: Source
    target: Target  # the CPU artifacts' target (the host's when the requested target is a GPU)
    host: Target
    gpu: Target | None
    activations: str
    log: Callable

    @property
    def cpu_targets(self) -> list[Target]:
        """The target's artifacts, and the host's too (what validate and bench run here)."""
        return [self.target] + ([self.host] if self.host.name != self.target.name else [])

    def manifest_base(self, fmt: str, stage: Path, versions: dict) -> dict:
        """The fields every manifest shares (format, versions, source, target, inputs)."""
        src, inputs = self.source, self.source.inputs
        return {
            "format": f"spfq-deploy/{fmt}-export", "format_version": 1,
            "created": _created(),
            "versions": {"spfq_deploy": __version__, **versions, "torch": torch.__version__,
                         "python": sys.version.split()[0]},
            "source": {"file": "model.spfq", "from": str(src.path), "model_spec": src.spec,
                       "sha256": file_table(stage, ["model.spfq"])["model.spfq"]["sha256"],
                       "format_version": container.read_header(stage / "model.spfq")["format_version"]},
            "target": self.target.name, "host": self.host.name, "activations": self.activations,
            "int8_quantizer": INT8_QUANTIZER,
            "inputs": {"file": "inputs.npz", "names": inputs.input_names, "outputs": inputs.output_names},
        }


def _created() -> str:
    """UTC time of the export, or SOURCE_DATE_EPOCH's (reproducible builds)."""
    epoch = os.environ.get("SOURCE_DATE_EPOCH")
    t = int(epoch) if epoch and epoch.isdigit() else time.time()
    return time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime(t))


def save_inputs(path: Path, names: list[str], arrays) -> None:
    """np.savez without its clock: fixed zip timestamps, so the same inputs give the same bytes."""
    with zipfile.ZipFile(path, "w", zipfile.ZIP_STORED) as z:
        for name, a in zip(names, arrays):
            info = zipfile.ZipInfo(f"{name}.npy", date_time=(1980, 1, 1, 0, 0, 0))
            with z.open(info, "w", force_zip64=True) as f:
                np.lib.format.write_array(f, np.ascontiguousarray(np.asarray(a)), allow_pickle=False)


def resolve_target(name: str | None, target_file: str | os.PathLike | None) -> Target:
    if name is not None and target_file is not None:
        raise SpfqError("give --target or --target-file, not both")
    if target_file is not None:
        return load_target_file(target_file)
    return get_target(name) if name is not None else host_target()


def export(spfq_path: str | os.PathLike, out_dir: str | os.PathLike, formats: tuple[str, ...] = ("onnx",),
           target: str | None = None, target_file: str | os.PathLike | None = None, activations: str = "int8",
           flavours: tuple[str, ...] | None = None, force: bool = False, model_spec: str | None = None,
           dynamic: bool = True, tune=None, log=print) -> dict[str, dict]:
    """Write the export of a .spfq file into out_dir; returns {manifest file name: manifest}.

    formats: "onnx" and/or "tvm" (CPU artifacts); a GPU target adds the CUDA artifact.
    tune: tvm.tuning.TuneOptions (MetaSchedule tuning of the host TVM library), tvm only."""
    from . import cuda as cuda_backend
    from . import onnx as onnx_backend
    from . import tvm as tvm_backend

    t0 = time.perf_counter()
    formats = tuple(dict.fromkeys(formats))
    bad = [f for f in formats if f not in FORMATS]
    if bad or not formats:
        raise SpfqError(f"unknown format {bad[0] if bad else '(none)'!r} (known: {', '.join(FORMATS)}, all)")
    if activations not in ("float", "int8"):
        raise SpfqError(f"activations must be 'float' or 'int8', got {activations!r}")
    if tune is not None and tune.enabled and "tvm" not in formats:
        raise SpfqError("--tune-trials / --tune-db / --tune-shape tune the TVM library: use them with --format tvm or all")
    spfq_path, out = Path(spfq_path), Path(out_dir)
    tgt = resolve_target(target, target_file)
    host = host_target()
    gpu = tgt if tgt.cuda else None
    folder.check_output(out, force)
    container.read_header(spfq_path)  # a bad .spfq fails before any compiler runs
    job = ExportJob(source=None, target=host if gpu else tgt, host=host, gpu=gpu, activations=activations, log=log)
    # backends check their tools and build what they link (cached) before the slow tracing
    backends = []
    if "onnx" in formats:
        backends.append(onnx_backend.Backend(job, flavours or onnx_backend.FLAVOURS))
    if "tvm" in formats:
        backends.append(tvm_backend.Backend(job, dynamic, tune))
    if gpu is not None:
        if activations == "float":
            log("note: the CUDA kernels quantise activations to int8 per row (there are no float-activation "
                "GPU kernels); the CPU artifacts use float activations")
        backends.append(cuda_backend.Backend(job))
    job.source = load_source(spfq_path, model_spec)
    for b in backends:
        b.prepare()  # tracing / graph building: may fail on the model, still before the folder exists
    manifests = {}
    with staged_directory(out, force, replaceable=folder.not_replaceable) as stage:
        shutil.copyfile(spfq_path, stage / "model.spfq")
        save_inputs(stage / "inputs.npz", job.source.inputs.input_names, job.source.inputs.args)
        shared = list(SHARED_FILES)
        if job.source.generation is not None:
            gen = dict(job.source.generation)
            (stage / "tokenizer.json").write_text(gen.pop("tokenizer_json"))
            (stage / "generation.json").write_text(json.dumps(gen, indent=2) + "\n")
            shared += GENERATION_FILES
        for b in backends:
            fields, own = b.write(stage)
            manifest = {**fields, "files": file_table(stage, shared + own)}
            (stage / b.MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
            manifests[b.MANIFEST] = manifest
    log(f"wrote {out} in {time.perf_counter() - t0:.1f} s")
    return manifests
