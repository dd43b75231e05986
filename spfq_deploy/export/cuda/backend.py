"""`spfq-deploy export FILE --target cuda`: the CUDA kernel library and what a GPU host needs to run
the compressed layers with it, added to the host's CPU export in one atomic folder.

    OUT/lib/cuda/libspfq_cuda.so   kernels/cuda built with nvcc for every gencode of targets/cuda.toml
                                   (cudart static: the device needs only the NVIDIA driver)
    OUT/model.spfq                 the packed weights (uploaded at load time, see below)
    OUT/inputs.npz                 the example inputs (validate uses them)
    OUT/manifest.cuda.json         library, architectures, nvcc, per-layer kernel layout, sha256

GPU weight layout: none of its own. spfq_deploy.cuda_runtime packs each layer with the CPU kernel
ABI (spfq_deploy.kernels.kernel_pack, preferred_layout) and uploads those words unchanged; the
manifest records that ("gpu_layout") so a later GPU-only repack has a place to say so.
"""

from __future__ import annotations

import json
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..atomic import staged_directory
from ..errors import SpfqError
from ..kernels import kernel_pack, preferred_layout
from ..pack import container
from ..targets import Target, get_target
from . import cuda_library
from .source import file_table, load_source

MANIFEST = "manifest.cuda.json"
LIBRARY = f"lib/cuda/{cuda_library.LIB_NAME}"
GPU_LAYOUT = ("cpu-kernel-abi: the CPU kernel-ABI words (spfq_deploy.kernels.kernel_pack) uploaded unchanged "
              "at load time; no GPU-only repack")


def _layers(cm) -> dict:
    """Per compressed layer: the kernel layout the GPU runs it with."""
    out = {}
    for name, layer in cm.layers.items():
        layout, bits, _ = kernel_pack(layer, preferred_layout(layer))
        out[name] = {"kind": layer.kind, "shape": list(layer.weight_shape), "layout": layout, "field_bits": bits,
                     "groups": int(layer.conv["groups"]) if layer.conv else 1,
                     "entry_point": "spfq_cuda_matmul_sparse_i8" if layout == "sparse" else "spfq_cuda_matmul_i8"}
    return out


def export_cuda(spfq_path: str | Path, out_dir: str | Path, target: str = "cuda", force: bool = False,
                model_spec: str | None = None, merge: bool = False, log=print) -> dict:
    """Add the CUDA artifact to out_dir (merge: keep the CPU export already there); returns the manifest."""
    spfq_path = Path(spfq_path)
    tgt: Target = get_target(target)
    if not tgt.cuda:
        raise SpfqError(f"target {tgt.name} is not a GPU target (no [cuda] table in targets/{tgt.name}.toml)")
    if Path(out_dir).exists() and not (force or merge):
        raise SpfqError(f"{out_dir} exists (use --force to replace it)")
    cm, spec, _, inputs = load_source(spfq_path, model_spec)
    t0 = time.perf_counter()
    log(f"building the CUDA kernel library (nvcc, {' '.join(cuda_library.arch_list(tgt))}) ...")
    lib = cuda_library.build(tgt)
    layers = _layers(cm)
    with staged_directory(out_dir, force or merge) as stage:
        if merge and Path(out_dir).is_dir():
            shutil.copytree(out_dir, stage, dirs_exist_ok=True)
        (stage / LIBRARY).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(lib, stage / LIBRARY)
        if not (stage / "model.spfq").is_file():
            shutil.copyfile(spfq_path, stage / "model.spfq")
        if not (stage / "inputs.npz").is_file():
            np.savez(stage / "inputs.npz", **{n: np.asarray(a) for n, a in zip(inputs.input_names, inputs.args)})
        manifest = _manifest(stage, spfq_path, spec, tgt, layers, inputs)
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"  {LIBRARY}: {(Path(out_dir) / LIBRARY).stat().st_size:,} bytes; wrote {out_dir} "
        f"in {time.perf_counter() - t0:.1f} s")
    return manifest


def _manifest(stage: Path, spfq_path: Path, spec, tgt: Target, layers: dict, inputs) -> dict:
    from ..cuda_runtime import CudaLibrary  # loading needs no GPU: the driver is opened on first use

    files = file_table(stage)
    nvcc = cuda_library.find_nvcc(tgt)
    return {
        "format": "spfq-deploy/cuda-export", "format_version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": {"spfq_deploy": __version__, "nvcc": cuda_library.nvcc_version(nvcc),
                     "torch": torch.__version__, "python": sys.version.split()[0]},
        "source": {"file": "model.spfq", "from": str(spfq_path), "model_spec": spec,
                   "sha256": files["model.spfq"]["sha256"],
                   "format_version": container.read_header(stage / "model.spfq")["format_version"]},
        "target": tgt.name, "activations": "int8",
        "library": {"file": LIBRARY, "info": CudaLibrary(stage / LIBRARY).info, "architectures": cuda_library.arch_list(tgt),
                    "gencode": list(tgt.cuda.get("gencode", [])), "abi": "kernels/cuda/spfq_cuda.h",
                    "needs": "NVIDIA driver (libcuda.so.1) new enough for the CUDA runtime above; no CUDA toolkit",
                    "load": "spfq_deploy.cuda_runtime.CudaLibrary('lib/cuda/libspfq_cuda.so')"},
        "gpu_layout": GPU_LAYOUT,
        "run": "spfq-deploy validate OUT --target cuda (compressed layers on the GPU, float ops in PyTorch on the host)",
        "inputs": {"file": "inputs.npz", "names": inputs.input_names, "outputs": inputs.output_names},
        "layers": layers, "files": files,
    }
