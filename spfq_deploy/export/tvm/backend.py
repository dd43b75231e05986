"""`spfq-deploy export FILE --format tvm`: the compressed model compiled by Apache TVM into one
shared library per target, the packed layers calling the project's C kernels linked inside it.

    OUT/model.<target>.so   Relax VM executable + TVM-generated code for the float ops + the C
                            kernels and their tvm-ffi wrapper (kernels/tvm/spfq_tvm_ops.cc);
                            packed weights are constants in it. The target's, and the host's.
    OUT/model.spfq          the packed weights the libraries were made from
    OUT/inputs.npz          the example inputs (argument order), also the runner's test input
    OUT/run_tvm.py          runs a library with only numpy + apache-tvm(-ffi) on the device
    OUT/manifest.tvm.json   versions, TVM target dicts, per-layer kernel layouts, sha256 of files

Path: torch.export of the reference model with a marker op per compressed layer
(tvm_graph.py) -> Relax (from_exported_program + custom_convert_map emitting
R.call_dps_packed("spfq_packed_layer", ...)) -> tvm.compile for the target's TVM dict ->
export_library with the target's C++ compiler (a cross compiler for arm64) and the kernel
objects (tvm_library.py) as addons.
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
import time
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..atomic import staged_directory
from ..errors import SpfqError
from ..pack import container
from ..targets import Target, get_target
from . import tvm_graph, tvm_library
from .capture import ExportInputs
from .source import file_table, load_source

HOST = {"x86_64": "x86_64", "aarch64": "arm64"}.get(platform.machine(), "")
MANIFEST = "manifest.tvm.json"
RUNNER = Path(__file__).with_name("tvm_runner.py")
ELF_MACHINES = {62: "x86_64", 183: "aarch64"}


def library_name(target: str) -> str:
    return f"model.{target}.so"


def elf_machine(path: str | Path) -> str:
    """'x86_64' / 'aarch64' from an ELF header (what the library was compiled for)."""
    head = Path(path).read_bytes()[:20]
    if head[:4] != b"\x7fELF":
        raise SpfqError(f"{path}: not an ELF file")
    code = int.from_bytes(head[18:20], "little" if head[5] == 1 else "big")
    return ELF_MACHINES.get(code, f"e_machine {code}")


def tvm_target(tgt: Target):
    import tvm

    if not tgt.tvm:
        raise SpfqError(f"target {tgt.name}: no [tvm] table in targets/{tgt.name}.toml")
    try:
        return tvm.target.Target(dict(tgt.tvm))
    except Exception as exc:  # TVM raises its own error types for a bad dict
        raise SpfqError(f"target {tgt.name}: TVM rejects its [tvm] table ({str(exc).splitlines()[0]})") from None


def compile_library(mod, tgt: Target, path: Path) -> Path:
    """tvm.compile `mod` for `tgt` and link it with the kernel objects into `path`."""
    import tvm

    objs = tvm_library.build(tgt)
    try:
        ex = tvm.compile(mod, target=tvm_target(tgt))
    except SpfqError:
        raise
    except Exception as exc:
        raise SpfqError(f"TVM could not compile the model for {tgt.name}: {str(exc).strip().splitlines()[-1]}") from None
    try:
        ex.export_library(str(path), cc=tgt.cxx, addons=[str(o) for o in objs], options=list(tvm_library.LINK_OPTIONS))
    except Exception as exc:
        raise SpfqError(f"linking the TVM library for {tgt.name} failed: {str(exc).strip().splitlines()[-1]}") from None
    return path


def build_module(model, cm, inputs: ExportInputs, activations: str, dynamic: bool = True, log=print):
    """(Relax IRModule, per-layer info, {input: [symbolic axes]} of the traced program)."""
    try:
        ep, names = tvm_graph.export_program(model, cm, inputs, dynamic=dynamic)
    except SpfqError as exc:
        if not dynamic or not inputs.dynamic_axes:
            raise
        # some models only trace with fixed shapes (data-dependent control flow on a size)
        log(f"warning: {exc}; exporting with the example inputs' fixed shapes instead")
        ep, names = tvm_graph.export_program(model, cm, inputs, dynamic=False)
    mod, infos = tvm_graph.to_relax(ep, cm, names, activations)
    return mod, infos, tvm_graph.dynamic_inputs(ep, inputs.input_names)


def float_library(model, inputs: ExportInputs, path: str | Path, target: str | None = None, log=print) -> Path:
    """The uncompressed model through the same pipeline (torch.export -> Relax -> tvm.compile ->
    export_library), no packed layer: the fp32 TVM baseline the benchmarks compare against."""
    from ..compressed import CompressedModel

    mod, _, _ = build_module(model, CompressedModel(layers={}, float_params={}), inputs, "float", log=log)
    return compile_library(mod, get_target(target or HOST), Path(path))


def export_tvm(spfq_path: str | Path, out_dir: str | Path, target: str | None = None, activations: str = "int8",
               force: bool = False, model_spec: str | None = None, dynamic: bool = True, merge: bool = False,
               log=print) -> dict:
    """Write the TVM export of a .spfq file into out_dir; returns the manifest.

    merge: out_dir already holds another export (the ONNX one): keep its files and add ours,
    still replacing the folder atomically."""

    spfq_path = Path(spfq_path)
    tgt = get_target(target or HOST)
    if activations not in ("float", "int8"):
        raise SpfqError(f"activations must be 'float' or 'int8', got {activations!r}")
    if Path(out_dir).exists() and not (force or merge):
        raise SpfqError(f"{out_dir} exists (use --force to replace it)")
    names = [tgt.name] + ([HOST] if HOST and tgt.name != HOST else [])
    targets = [get_target(n) for n in names]
    for t in targets:
        t.require(t.cc, t.cxx)
    cm, spec, model, inputs = load_source(spfq_path, model_spec)

    t0 = time.perf_counter()
    log(f"tracing {spec} with torch.export and importing it into Relax ...")
    mod, layers, dynamic = build_module(model, cm, inputs, activations, dynamic, log)
    with staged_directory(out_dir, force or merge) as stage:
        if merge and Path(out_dir).is_dir():
            shutil.copytree(out_dir, stage, dirs_exist_ok=True)
        libs = {}
        for t in targets:
            log(f"compiling for {t.name} (TVM {json.dumps(t.tvm)}, {t.cxx}) ...")
            path = compile_library(mod, t, stage / library_name(t.name))
            libs[t.name] = {"file": path.name, "elf_machine": elf_machine(path), "tvm_target": dict(t.tvm),
                            "cxx": t.cxx, "cflags": list(t.cflags), "kernel_isa": t.kernel_isa}
            log(f"  {path.name}: {path.stat().st_size:,} bytes")
        if HOST in libs:
            libs[HOST]["library_info"] = library_info(stage / library_name(HOST))
        shutil.copyfile(spfq_path, stage / "model.spfq")
        np.savez(stage / "inputs.npz", **{n: np.asarray(a) for n, a in zip(inputs.input_names, inputs.args)})
        shutil.copyfile(RUNNER, stage / "run_tvm.py")
        manifest = _manifest(stage, spfq_path, spec, tgt, activations, libs, layers, inputs, dynamic)
        (stage / MANIFEST).write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"wrote {out_dir} in {time.perf_counter() - t0:.1f} s")
    return manifest


def load(path: str | Path):
    """(VirtualMachine, library module) of a host-loadable model.<target>.so."""
    import tvm
    from tvm.runtime.vm import VirtualMachine

    try:
        lib = tvm.runtime.load_module(str(path))
    except Exception as exc:
        raise SpfqError(f"{path}: cannot load the TVM library ({str(exc).strip().splitlines()[-1]})") from None
    return VirtualMachine(lib, tvm.cpu()), lib


def run(vm, *arrays) -> list[np.ndarray]:
    """The model's outputs for numpy inputs (a tuple result flattened)."""
    import tvm

    out = vm["main"](*[tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays])
    flat, stack = [], [out]
    while stack:
        v = stack.pop(0)
        if hasattr(v, "numpy"):
            flat.append(v.numpy())
        else:
            stack[0:0] = list(v)
    return flat


def kernel_calls(lib) -> int:
    """GEMM calls the packed kernels made in this process (all libraries of this build share it)."""
    return int(lib.get_function("spfq_tvm_calls", query_imports=True)())


def library_info(path: str | Path) -> str:
    _, lib = load(path)
    return str(lib.get_function("spfq_tvm_library_info", query_imports=True)())


def _manifest(stage: Path, spfq_path: Path, spec, tgt: Target, activations, libs, layers, inputs, dynamic) -> dict:
    import tvm
    import tvm_ffi

    files = file_table(stage)
    return {
        "format": "spfq-deploy/tvm-export", "format_version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": {"spfq_deploy": __version__, "tvm": tvm.__version__, "tvm_ffi": tvm_ffi.__version__,
                     "torch": torch.__version__, "python": sys.version.split()[0]},
        # the device needs exactly these (mismatched tvm / tvm-ffi versions break silently)
        "runtime_packages": ["numpy", f"apache-tvm=={tvm.__version__}", f"apache-tvm-ffi=={tvm_ffi.__version__}"],
        "run": f"python run_tvm.py {library_name(tgt.name)} inputs.npz -o outputs.npz",
        "source": {"file": "model.spfq", "from": str(spfq_path), "model_spec": spec,
                   "sha256": files["model.spfq"]["sha256"],
                   "format_version": container.read_header(stage / "model.spfq")["format_version"]},
        "target": tgt.name, "host": HOST, "activations": activations,
        "packed_function": tvm_graph.PACKED_FUNC, "attrs": list(tvm_graph.ATTR_FIELDS),
        "inputs": {"file": "inputs.npz", "names": inputs.input_names, "outputs": inputs.output_names,
                   "shapes": {n: list(np.shape(a)) for n, a in zip(inputs.input_names, inputs.args)},
                   # the axes that stayed symbolic in the compiled program (any size runs there)
                   "dynamic_axes": dynamic},
        "libraries": libs, "layers": layers, "files": files,
    }
