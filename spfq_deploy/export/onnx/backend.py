"""`spfq-deploy export FILE --format onnx`: the three ONNX flavours, the custom-op libraries and
a manifest, written as one folder that appears only when everything in it is complete.

    OUT/model.spfq.onnx     packed initializers + ai.spfq custom ops   (needs lib/<target>/libspfq_ort.so)
    OUT/model.stock.onnx    standard ONNX: int4/int8 DequantizeLinear (+ MatMul -> MatMulNBits in ORT)
    OUT/model.qonnx.onnx    QONNX Quant / BipolarQuant (qonnx.custom_op.general)
    OUT/lib/<target>/libspfq_ort.so   the custom-op library: the host's, and the target's
    OUT/model.spfq          the packed weights the artifacts were made from
    OUT/inputs.npz          the example inputs the graph was traced with (validate uses them)
    OUT/run_onnx.py         runs a flavour with only numpy + onnxruntime on the device
    OUT/manifest.json       versions, opset / IR, bit-packing convention, sha256 of every file
"""

from __future__ import annotations

import json
import platform
import shutil
import sys
import time
import warnings
from pathlib import Path

import numpy as np
import torch

from .. import __version__
from ..atomic import staged_directory
from ..errors import SpfqError
from ..pack import container
from ..targets import Target, get_target
from . import capture as cap
from . import onnx_custom, onnx_graph, onnx_qonnx, onnx_stock, ort_library
from .source import file_table, load_source

FLAVOURS = ("custom", "stock", "qonnx")
FILES = {"custom": "model.spfq.onnx", "stock": "model.stock.onnx", "qonnx": "model.qonnx.onnx"}
HOST = {"x86_64": "x86_64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
RUNNER = Path(__file__).with_name("onnx_runner.py")
BIT_PACKING = ("ai.spfq weights: 64-bit little-endian words along K (the reduction axis), bit j of a row "
               "in bit j%64 of word j/64, rows zero-padded to ceil(K/64) words; sign bit 1 = negative; "
               "mask bit 1 = nonzero; planes hold u = c + 2^(b-1) one bit-plane per bit; sparse holds "
               "each row's nonzero codes in column order as (c<0) | ((|c|-1) << 1). Value of code c in "
               "row n: sign(c) * (lam[n] + (|c|-1) * scale[n]) (lam = scale when absent). "
               "Stock: int4/int8 two's complement, two int4 per byte, low nibble first.")


def _write_model(model, path: Path) -> None:
    data = model.SerializeToString()
    path.write_bytes(data)


def export_onnx(spfq_path: str | Path, out_dir: str | Path, target: str | None = None,
                activations: str = "int8", flavours: tuple[str, ...] = FLAVOURS, force: bool = False,
                model_spec: str | None = None, log=print) -> dict:
    """Write the ONNX export of a .spfq file into out_dir; returns the manifest."""
    spfq_path = Path(spfq_path)
    tgt: Target = get_target(target or HOST)
    if activations not in ("float", "int8"):
        raise SpfqError(f"activations must be 'float' or 'int8', got {activations!r}")
    bad = [f for f in flavours if f not in FLAVOURS]
    if bad:
        raise SpfqError(f"unknown flavour {bad[0]!r} (known: {', '.join(FLAVOURS)})")
    if Path(out_dir).exists() and not force:
        raise SpfqError(f"{out_dir} exists (use --force to replace it)")
    cm, spec, model, inputs = load_source(spfq_path, model_spec)

    libs, skipped = _libraries(tgt, "custom" in flavours, log)
    t0 = time.perf_counter()
    log(f"tracing {spec} with torch.onnx.export ...")
    graph = cap.capture(model, cm, inputs)
    builders = {
        "custom": (onnx_custom.builder(activations), {onnx_custom.DOMAIN: onnx_custom.DOMAIN_VERSION}),
        "stock": (onnx_stock.builder(), {}),
        "qonnx": (onnx_qonnx.builder(), {onnx_qonnx.DOMAIN: onnx_qonnx.DOMAIN_VERSION}),
    }
    with staged_directory(out_dir, force) as stage:
        artifacts, layers = {}, {}
        for flavour in flavours:
            if flavour in skipped:
                continue
            build, domains = builders[flavour]
            proto, infos = onnx_graph.rewrite(graph, cm, build, domains)
            _write_model(proto, stage / FILES[flavour])
            artifacts[FILES[flavour]] = {"flavour": flavour, "opset": cap.GRAPH_OPSET, "ir_version": proto.ir_version,
                                         "domains": {o.domain or "ai.onnx": o.version for o in proto.opset_import}}
            for name, info in infos.items():
                layers.setdefault(name, {})[flavour] = info
            log(f"  {FILES[flavour]}: {(stage / FILES[flavour]).stat().st_size:,} bytes")
        lib_entries = {}
        for tname, lib in libs.items():
            dest = ort_library.copy_to(lib, stage / "lib" / tname / ort_library.LIB_NAME)
            lib_entries[tname] = str(dest.relative_to(stage))
        shutil.copyfile(spfq_path, stage / "model.spfq")
        np.savez(stage / "inputs.npz", **{n: np.asarray(a) for n, a in zip(inputs.input_names, inputs.args)})
        shutil.copyfile(RUNNER, stage / "run_onnx.py")
        manifest = _manifest(stage, spfq_path, spec, tgt, activations, artifacts, layers, lib_entries, skipped, inputs)
        (stage / "manifest.json").write_text(json.dumps(manifest, indent=2) + "\n")
    log(f"wrote {out_dir} in {time.perf_counter() - t0:.1f} s")
    return manifest


def _libraries(tgt: Target, want: bool, log) -> tuple[dict, dict]:
    """Build the custom-op library for the host and the target; {} and a reason when impossible."""
    if not want:
        return {}, {}
    try:
        ort_library.headers_dir()
    except ort_library.OrtHeadersMissing as exc:
        warnings.warn(str(exc))
        log(f"warning: {exc}")
        return {}, {"custom": str(exc)}
    libs = {}
    names = [tgt.name] + ([HOST] if tgt.name != HOST else [])
    for name in names:
        t = get_target(name)
        log(f"building the custom-op library for {name} ({t.cxx}) ...")
        libs[name] = ort_library.build(t)  # a missing compiler for the requested target is an error
    return libs, {}


def _manifest(stage: Path, spfq_path: Path, spec, tgt: Target, activations, artifacts, layers, libs, skipped, inputs) -> dict:
    import onnx
    import onnxruntime

    files = file_table(stage)
    lib_info = {}
    if libs:
        lib_info = {"files": libs, "headers": ort_library.headers_info(), "domain": onnx_custom.DOMAIN,
                    "domain_version": onnx_custom.DOMAIN_VERSION,
                    "load": "SessionOptions.register_custom_ops_library('lib/<target>/libspfq_ort.so')",
                    "run": "python run_onnx.py model.spfq.onnx inputs.npz --library lib/<target>/libspfq_ort.so "
                           "-o outputs.npz (numpy + the target's onnxruntime)"}
        if HOST in libs:
            lib_info["host_library_info"] = ort_library.library_info(stage / libs[HOST])
    return {
        "format": "spfq-deploy/onnx-export", "format_version": 1,
        "created": time.strftime("%Y-%m-%dT%H:%M:%SZ", time.gmtime()),
        "versions": {"spfq_deploy": __version__, "onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__,
                     "torch": torch.__version__, "python": sys.version.split()[0]},
        "source": {"file": "model.spfq", "from": str(spfq_path), "model_spec": spec,
                   "sha256": files["model.spfq"]["sha256"],
                   "format_version": container.read_header(stage / "model.spfq")["format_version"]},
        "target": tgt.name, "host": HOST, "activations": activations,
        "opset": cap.GRAPH_OPSET, "ir_version": cap.IR_VERSION,
        "inputs": {"file": "inputs.npz", "names": inputs.input_names, "outputs": inputs.output_names,
                   "dynamic_axes": {k: {str(a): v for a, v in ax.items()} for k, ax in inputs.dynamic_axes.items()}},
        "stock_accuracy_level": "session.qdq_matmulnbits_accuracy_level: 0 = float (parity), 4 = int8 compute",
        "bit_packing": BIT_PACKING,
        "artifacts": artifacts, "custom_op_library": lib_info, "skipped": skipped,
        "layers": layers, "files": files,
    }
