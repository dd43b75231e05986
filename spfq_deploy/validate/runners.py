"""Find the artifacts of an export folder and run each one the way it is meant to run.

ONNX flavours: onnxruntime sessions (spfq_deploy.export.onnx.session.session, custom-op library
registered) and the qonnx executor (run_qonnx). TVM libraries: in this process for a native
target (spfq_deploy.export.tvm.runtime.load / run), under qemu-aarch64 with build/arm64-python
and the folder's run_tvm.py for an aarch64 target. The runner scripts are executed, so each
runs only as a private copy of bytes whose sha256 is the manifest's (verified_runner). A library
whose checksum differs from the manifest is first loaded in a child process, so a truncated file
gives a load error, not a crash of the validator.
"""

from __future__ import annotations

import hashlib
import json
import subprocess
import sys
import tempfile
import time
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from ..errors import SpfqError
from ..export.onnx import session as ort_runners
from ..targets import get_target

ROOT = Path(__file__).resolve().parents[2]
ARM64_PYTHON = ROOT / "build" / "arm64-python" / "python3"
QONNX_SAMPLES = 8  # the qonnx executor runs node by node in numpy: a few samples
REPEATS = 3


@dataclass
class Artifact:
    file: str  # relative to the export folder
    flavour: str  # custom | stock | qonnx | tvm
    target: str
    kind: str  # a key of tolerances.TOLERANCES
    reference: str  # "float" (dequantised model) | "int8" (integer reference)
    label: str
    library: str | None = None  # custom-op library (cuda: the packed weights it uploads), relative
    accuracy_level: int | None = None
    skip: str | None = None  # why this artifact x target cannot run here
    runner: str = "native"  # native | qemu | cuda
    notes: list = field(default_factory=list)
    float_layers: frozenset = frozenset()  # layers an int8 artifact runs weight-only (its manifest says)


def _float_layers(layers: dict, flavour: str | None) -> frozenset:
    """Names of the manifest's layers recorded with activation 'float' (kernels.layer_activation)."""
    return frozenset(n for n, v in (layers or {}).items()
                     if ((v.get(flavour) if flavour else v) or {}).get("activation") == "float")




def _runner_for(target: str) -> tuple[str, str | None]:
    """('native' | 'qemu', None) or (_, why it cannot run here)."""
    try:
        t = get_target(target)
    except Exception:
        return "native", f"unknown target {target!r} (no targets/{target}.toml)"
    if t.native:
        return "native", None
    if t.run == "qemu-aarch64":
        if not ARM64_PYTHON.is_file():
            return "qemu", f"{ARM64_PYTHON.parent} is missing: run `make arm64-python` to run aarch64 libraries under qemu"
        return "qemu", None
    return "native", f"target {target} runs with {t.run!r}, which this host cannot do"


def _onnx_qemu_problem(out: Path) -> str | None:
    """None when an aarch64 ONNX artifact of this folder can run under qemu here, else why not."""
    if not (ARM64_PYTHON.parent / "site" / "onnxruntime").is_dir():
        return (f"{ARM64_PYTHON.parent} has no onnxruntime: run `make arm64-python` (it adds the version "
                "targets/arm64.toml names)")
    if not (out / "run_onnx.py").is_file():
        return "the folder has no run_onnx.py (exported by an older spfq-deploy): export it again"
    return None


def discover(out: Path, onnx_manifest: dict | None, tvm_manifest: dict | None, host: str,
             cuda_manifest: dict | None = None) -> list[Artifact]:
    """Every artifact x target in the folder, in a fixed order."""
    arts: list[Artifact] = []
    if onnx_manifest is not None:
        act = onnx_manifest.get("activations", "int8")
        files = {v.get("flavour"): k for k, v in onnx_manifest.get("artifacts", {}).items()}
        libs = onnx_manifest.get("custom_op_library", {}).get("files", {})
        if "custom" in files:
            kind = "int8" if act == "int8" else "float"
            for tname, lib in libs.items() or [(host, None)]:
                a = Artifact(files["custom"], "custom", tname, kind, kind,
                             f"onnx custom ops, {act} act.", library=lib,
                             float_layers=_float_layers(onnx_manifest.get("layers"), "custom") if kind == "int8"
                             else frozenset())
                if lib is None:
                    a.skip = "the manifest names no custom-op library"
                elif tname != host:
                    a.runner, a.skip = _runner_for(tname)
                    a.skip = a.skip or _onnx_qemu_problem(out)
                    a.label += " (qemu-aarch64)"
                arts.append(a)
        if "stock" in files:
            arts.append(Artifact(files["stock"], "stock", host, "float", "float", "onnx stock, accuracy level 0",
                                 accuracy_level=0))
            arts.append(Artifact(files["stock"], "stock", host, "info", "float",
                                 "onnx stock, accuracy level 4 (int8 compute)", accuracy_level=4))
        if "qonnx" in files:
            arts.append(Artifact(files["qonnx"], "qonnx", host, "float", "float",
                                 f"qonnx (qonnx executor, first {QONNX_SAMPLES} samples)"))
    if tvm_manifest is not None:
        act = tvm_manifest.get("activations", "int8")
        kind = "int8" if act == "int8" else "float"
        for tname, info in tvm_manifest.get("libraries", {}).items():
            runner, skip = _runner_for(tname)
            arts.append(Artifact(info.get("file", f"model.{tname}.so"), "tvm", tname, kind, kind,
                                 f"tvm library, {act} act." + (" (qemu-aarch64)" if runner == "qemu" else ""),
                                 skip=skip, runner=runner,
                                 float_layers=_float_layers(tvm_manifest.get("layers"), None) if kind == "int8"
                                 else frozenset()))
    if cuda_manifest is not None:
        lib = (cuda_manifest.get("library") or {}).get("file", "lib/cuda/libspfq_cuda.so")
        arts.append(Artifact(lib, "cuda", cuda_manifest.get("target", "cuda"), "int8", "int8",
                             "cuda kernels, int8 act.", library="model.spfq", runner="cuda"))
    return arts


def elf_problem(path: Path) -> str | None:
    """None when the ELF headers and every loadable segment lie inside the file, else why not
    (dlopen of a truncated library can kill the process with SIGBUS instead of failing)."""
    import struct

    data = path.read_bytes()
    if data[:4] != b"\x7fELF" or len(data) < 64 or data[4] != 2:
        return "not a 64-bit ELF shared library"
    end = "<" if data[5] == 1 else ">"
    phoff, shoff = struct.unpack_from(end + "QQ", data, 32)
    phentsize, phnum, shentsize, shnum = struct.unpack_from(end + "HHHH", data, 54)
    if phoff + phnum * phentsize > len(data) or shoff + shnum * shentsize > len(data):
        return f"truncated ELF file ({len(data):,} bytes; its headers end past that)"
    for i in range(phnum):
        p_type, _, p_offset, _, _, p_filesz = struct.unpack_from(end + "IIQQQQ", data, phoff + i * phentsize)
        if p_type == 1 and p_offset + p_filesz > len(data):  # PT_LOAD
            return f"truncated ELF file ({len(data):,} bytes; a loadable segment ends at {p_offset + p_filesz:,})"
    return None


def probe_library(path: Path, how: str) -> str | None:
    """Load a shared library in a child process; None if it loads, else the reason."""
    code = {"ort": "import onnxruntime as o, sys; o.SessionOptions().register_custom_ops_library(sys.argv[1])",
            "tvm": "import tvm, sys; tvm.runtime.load_module(sys.argv[1])",
            "cuda": "import ctypes, sys; ctypes.CDLL(sys.argv[1]).spfq_cuda_abi_version()"}[how]
    try:
        r = subprocess.run([sys.executable, "-c", code, str(path)], capture_output=True, text=True, timeout=300)
    except subprocess.TimeoutExpired:
        return "loading it did not finish in 300 s"
    if r.returncode == 0:
        return None
    if r.returncode < 0:
        return f"loading it kills the process (signal {-r.returncode})"
    lines = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
    return lines[-1][:300] if lines else f"loading it fails (exit {r.returncode})"


def _timed(fn, repeats: int = REPEATS):
    """(result of the first call, median ms of `repeats` more calls)."""
    result = fn()
    times = []
    for _ in range(repeats):
        t0 = time.perf_counter()
        fn()
        times.append((time.perf_counter() - t0) * 1e3)
    return result, float(np.median(times))


def run_onnx(out: Path, art: Artifact, feeds: dict) -> tuple[list, float | None]:
    path = out / art.file
    if art.flavour == "qonnx":
        small = {k: v[:QONNX_SAMPLES] for k, v in feeds.items()}
        t0 = time.perf_counter()
        outs = ort_runners.run_qonnx(path, small)
        return outs, (time.perf_counter() - t0) * 1e3
    sess = ort_runners.session(path, out / art.library if art.library else None, accuracy_level=art.accuracy_level)
    return _timed(lambda: sess.run(None, feeds))


def verified_runner(out: Path, name: str, files: dict, manifest: str, dest: Path) -> Path:
    """A private copy (in dest) of the folder's runner script `name`, made from bytes whose sha256
    is the one `manifest`'s files table records; SpfqError (and nothing run) otherwise. The copy is
    what runs, so the file cannot change between the check and its use."""
    path = out / name
    if not path.is_file():
        raise SpfqError(f"{name} is missing: not run")
    want = (files.get(name) or {}).get("sha256")
    if not want:
        raise SpfqError(f"{name} has no checksum in {manifest}: not run (validate executes it)")
    data = path.read_bytes()
    if hashlib.sha256(data).hexdigest() != want:
        raise SpfqError(f"{name}: sha256 differs from {manifest} ({len(data):,} bytes): not run "
                        "(validate executes it; export the folder again)")
    copy = dest / name
    copy.write_bytes(data)
    return copy


def _run_onnx_py_qemu(out: Path, model: Path, library: Path | None, feeds: dict, files: dict, manifest: str,
                      args: list[str], tmp: Path) -> dict:
    """The folder's run_onnx.py (checked against `files`, the manifest's table) in the arm64 Python
    under qemu-aarch64 on `feeds` with `args` (-o tmp/outputs.npz is added); its JSON report."""
    runner = verified_runner(out, "run_onnx.py", files, manifest, tmp)
    np.savez(tmp / "inputs.npz", **feeds)
    cmd = [str(ARM64_PYTHON), str(runner), str(model), str(tmp / "inputs.npz"), "-o", str(tmp / "outputs.npz"), *args]
    if library is not None:
        cmd += ["--library", str(library)]
    try:
        r = subprocess.run(cmd, capture_output=True, text=True, timeout=1800)
    except subprocess.TimeoutExpired:
        raise SpfqError("under qemu-aarch64: run_onnx.py did not finish in 1800 s") from None
    reports = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode or not reports or not (tmp / "outputs.npz").is_file():
        err = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
        raise SpfqError(f"under qemu-aarch64: {err[-1][:300] if err else f'run_onnx.py exit {r.returncode}'}")
    return reports[0]


def run_onnx_qemu(out: Path, model: Path, library: Path | None, feeds: dict, files: dict,
                  manifest: str = "manifest.json") -> tuple[dict, float]:
    """({output name: array}, ms per run) of an ONNX model run by the folder's run_onnx.py in the
    arm64 Python under qemu-aarch64 (latency: emulated, not a device figure)."""
    with tempfile.TemporaryDirectory(prefix="spfq-validate-") as tmp:
        tmp = Path(tmp)
        report = _run_onnx_py_qemu(out, model, library, feeds, files, manifest, ["--repeat", str(REPEATS)], tmp)
        with np.load(tmp / "outputs.npz") as o:
            values = {name: o[f"output_{i}"] for i, name in enumerate(report["outputs"])}
        return values, report["seconds_per_run"] * 1e3


def generate_onnx_qemu(out: Path, model: Path, library: Path | None, ids: list[int], steps: int, files: dict,
                       manifest: str = "manifest.json") -> list[int]:
    """The greedy tokens of run_onnx.py --generate (the device's loop) under qemu-aarch64."""
    with tempfile.TemporaryDirectory(prefix="spfq-validate-") as tmp:
        tmp = Path(tmp)
        _run_onnx_py_qemu(out, model, library, {"input_ids": np.asarray([ids], np.int64)}, files, manifest,
                          ["--generate", str(steps)], tmp)
        with np.load(tmp / "outputs.npz") as o:
            return [int(t) for t in o["generated"]]


def run_tvm_native(out: Path, art: Artifact, arrays: list) -> tuple[list, float]:
    from ..export.tvm import runtime as tvm_export

    vm, _ = tvm_export.load(out / art.file)
    return _timed(lambda: tvm_export.run(vm, *arrays))


def tvm_runner(out: Path, art: Artifact, names: list[str]):
    """run(feeds by name) -> outputs of a host TVM library (validate.decode's loop)."""
    from ..export.tvm import runtime as tvm_export

    vm, _ = tvm_export.load(out / art.file)
    return lambda feeds: tvm_export.run(vm, *[feeds[n] for n in names])


def run_cuda(out: Path, art: Artifact, refs, row: dict):
    """(outputs, latency ms, {layer: (input, output)}) of the reference model with every compressed
    layer on the GPU; raises Unavailable when the library finds no GPU."""
    import torch

    from ..cuda_runtime import CudaLayer, CudaLibrary, cuda_model

    lib = CudaLibrary(out / art.file)
    why = lib.unavailable()
    if why:
        raise Unavailable(why)
    row["device"] = lib.device_name(0)
    row["note"] = (f"on {row['device']}; float ops in PyTorch on the host; latency includes per-layer upload / "
                   "download (GPU kernel timings: benchmarks/cuda_gemm.py)")
    model = cuda_model(refs.model, refs.cm, lib)
    gpu_layers = {n: m for n, m in model.named_modules() if isinstance(m, CudaLayer)}
    for m in gpu_layers.values():
        m.record = True
    with torch.no_grad():
        y, ms = _timed(lambda: model(*refs.args))
    return y, ms, {n: m.last for n, m in gpu_layers.items() if m.last is not None}


class Unavailable(Exception):
    """This artifact cannot run on this machine (no GPU): the row is skipped, not failed."""


def run_tvm_qemu(out: Path, arts: list[Artifact], names: list[str], feeds: dict, files: dict,
                 manifest: str = "manifest.tvm.json") -> dict:
    """All aarch64 libraries in one qemu process (one `import tvm`, 10-20 s under emulation):
    {file: (outputs, latency ms) or an error string}. The folder's run_tvm.py runs only when its
    sha256 is the one `files` (the manifest's table) records."""
    results = {}
    with tempfile.TemporaryDirectory(prefix="spfq-validate-") as tmp:
        tmp = Path(tmp)
        try:
            runner = verified_runner(out, "run_tvm.py", files, manifest, tmp)
        except SpfqError as exc:
            return {a.file: str(exc) for a in arts}
        np.savez(tmp / "inputs.npz", **{n: feeds[n] for n in names})  # argument order
        argv = []
        for a in arts:
            argv += [str(out / a.file), str(tmp / "inputs.npz")]
        for i, _ in enumerate(arts):
            argv += ["-o", str(tmp / f"out{i}.npz")]
        try:
            r = subprocess.run([str(ARM64_PYTHON), str(runner), *argv, "--repeat", str(REPEATS)],
                               capture_output=True, text=True, timeout=1800)
        except subprocess.TimeoutExpired:
            return {a.file: "qemu run did not finish in 1800 s" for a in arts}
        reports = [json.loads(ln) for ln in r.stdout.splitlines() if ln.startswith("{")]
        err = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
        why = err[-1][:300] if err else f"run_tvm.py exit {r.returncode}"
        for i, a in enumerate(arts):
            if i < len(reports) and (tmp / f"out{i}.npz").is_file():
                with np.load(tmp / f"out{i}.npz") as o:
                    outs = [o[k] for k in sorted(o.files, key=lambda s: int(s.split("_")[1]))]
                # run_tvm.py times --repeat runs after the first (output) run is in the loop too
                results[a.file] = (outs, reports[i]["seconds_per_run"] * 1e3)
            else:
                results[a.file] = f"under qemu-aarch64: {why}"
    return results
