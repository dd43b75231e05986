"""The CUDA backend of an export job: the CUDA kernel library and what a GPU host needs to run
the compressed layers with it, added to the host's CPU artifacts in the same folder.

    OUT/lib/cuda/libspfq_cuda.so   kernels/cuda built with nvcc for every gencode of targets/cuda.toml
                                   (cudart static: the device needs only the NVIDIA driver)
    OUT/manifest.cuda.json         library, architectures, nvcc, per-layer kernel layout, sha256
(model.spfq, uploaded at load time, and inputs.npz are the job's.)

GPU weight layout: none of its own. spfq_deploy.cuda_runtime packs each layer with the CPU kernel
ABI (spfq_deploy.kernels.kernel_pack, preferred_layout) and uploads those words unchanged; the
manifest records that ("gpu_layout") so a later GPU-only repack has a place to say so.
"""

from __future__ import annotations

import shutil
from pathlib import Path

from ...kernels import kernel_pack, preferred_layout
from . import library

MANIFEST = "manifest.cuda.json"
LIBRARY = f"lib/cuda/{library.LIB_NAME}"
GPU_LAYOUT = ("cpu-kernel-abi: the CPU kernel-ABI words (spfq_deploy.kernels.kernel_pack) uploaded unchanged "
              "at load time; no GPU-only repack")


def _layers(cm) -> dict:
    """Per compressed layer: the kernel layout the GPU runs it with."""
    out = {}
    for name, layer in cm.layers.items():
        layout, bits, _ = kernel_pack(layer, preferred_layout(layer), groups_ok=True)
        out[name] = {"kind": layer.kind, "shape": list(layer.weight_shape), "layout": layout, "field_bits": bits,
                     "groups": int(layer.conv["groups"]) if layer.conv else 1,
                     "entry_point": "spfq_cuda_matmul_sparse_i8" if layout == "sparse" else "spfq_cuda_matmul_i8"}
        if layer.group_size:  # one call per scale group, outputs summed in group order (cuda_runtime.py)
            out[name]["group_size"] = layer.group_size
    return out


class Backend:
    """nvcc runs at construction (a missing toolchain fails before anything slow); write(stage)
    adds the library and manifest.cuda.json."""

    MANIFEST = MANIFEST

    def __init__(self, job):
        self.job, self.tgt = job, job.gpu
        job.log(f"building the CUDA kernel library (nvcc, {' '.join(library.arch_list(self.tgt))}) ...")
        self.lib = library.build(self.tgt)

    def prepare(self) -> None:
        pass

    def write(self, stage: Path) -> tuple[dict, list[str]]:
        from ...cuda_runtime import CudaLibrary  # loading needs no GPU: the driver is opened on first use

        job, tgt = self.job, self.tgt
        (stage / LIBRARY).parent.mkdir(parents=True, exist_ok=True)
        shutil.copyfile(self.lib, stage / LIBRARY)
        job.log(f"  {LIBRARY}: {(stage / LIBRARY).stat().st_size:,} bytes")
        nvcc = library.find_nvcc(tgt)
        fields = job.manifest_base("cuda", stage, {"nvcc": library.nvcc_version(nvcc)})
        fields.update({
            "target": tgt.name, "activations": "int8",
            "library": {"file": LIBRARY, "info": CudaLibrary(stage / LIBRARY).info,
                        "architectures": library.arch_list(tgt),
                        "gencode": list(tgt.cuda.get("gencode", [])), "abi": "kernels/cuda/spfq_cuda.h",
                        "needs": "NVIDIA driver (libcuda.so.1) new enough for the CUDA runtime above; no CUDA toolkit",
                        "load": "spfq_deploy.cuda_runtime.CudaLibrary('lib/cuda/libspfq_cuda.so')"},
            "gpu_layout": GPU_LAYOUT,
            "run": "spfq-deploy validate OUT --target cuda (compressed layers on the GPU, float ops in PyTorch on the host)",
            "layers": _layers(job.source.cm),
        })
        return fields, [LIBRARY]
