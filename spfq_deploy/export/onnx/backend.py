"""The ONNX backend of an export job: the three flavours, the custom-op libraries and
manifest.json, written into the job's staged folder.

    OUT/model.spfq.onnx     packed initializers + ai.spfq custom ops   (needs lib/<target>/libspfq_ort.so)
    OUT/model.stock.onnx    standard ONNX: int4/int8 DequantizeLinear (+ MatMul -> MatMulNBits in ORT)
    OUT/model.qonnx.onnx    QONNX Quant / BipolarQuant (qonnx.custom_op.general)
    OUT/lib/<target>/libspfq_ort.so   the custom-op library: the host's, and the target's
    OUT/run_onnx.py         runs a flavour with only numpy + onnxruntime on the device
    OUT/manifest.json       versions, opset / IR, bit-packing convention, sha256 of every file
(model.spfq and inputs.npz are the job's, shared by every backend.)
"""

from __future__ import annotations

import shutil
import warnings
from pathlib import Path

from ...errors import SpfqError
from . import capture as cap
from . import custom, graph, ort_library, qonnx, stock

FLAVOURS = ("custom", "stock", "qonnx")
FILES = {"custom": "model.spfq.onnx", "stock": "model.stock.onnx", "qonnx": "model.qonnx.onnx"}
RUNNER = Path(__file__).with_name("run_onnx.py")
BIT_PACKING = ("ai.spfq weights: 64-bit little-endian words along K (the reduction axis), bit j of a row "
               "in bit j%64 of word j/64, rows zero-padded to ceil(K/64) words; sign bit 1 = negative; "
               "mask bit 1 = nonzero; planes hold u = c + 2^(b-1) one bit-plane per bit; sparse holds "
               "each row's nonzero codes in column order as (c<0) | ((|c|-1) << 1). Value of code c in "
               "row n: sign(c) * (lam[n] + (|c|-1) * scale[n]) (lam = scale when absent). "
               "Stock: int4/int8 two's complement, two int4 per byte, low nibble first.")


class Backend:
    """Checks and builds what the flavours need at construction (before the slow tracing),
    traces in prepare(), writes in write(stage)."""

    MANIFEST = "manifest.json"

    def __init__(self, job, flavours: tuple[str, ...]):
        bad = [f for f in flavours if f not in FLAVOURS]
        if bad or not flavours:
            raise SpfqError(f"unknown flavour {bad[0] if bad else '(none)'!r} (known: {', '.join(FLAVOURS)})")
        self.job, self.flavours = job, tuple(dict.fromkeys(flavours))
        self.libs, self.skipped = self._libraries("custom" in self.flavours)
        self.graph = None

    def _libraries(self, want: bool) -> tuple[dict, dict]:
        """The custom-op library for the target and the host; {} and a reason when impossible."""
        if not want:
            return {}, {}
        try:
            ort_library.headers_dir()
        except ort_library.OrtHeadersMissing as exc:
            warnings.warn(str(exc))
            self.job.log(f"warning: {exc}")
            return {}, {"custom": str(exc)}
        libs = {}
        for t in self.job.cpu_targets:
            self.job.log(f"building the custom-op library for {t.name} ({t.cxx}) ...")
            libs[t.name] = ort_library.build(t)  # a missing compiler for the requested target is an error
        return libs, {}

    def prepare(self) -> None:
        src = self.job.source
        self.job.log(f"tracing {src.spec} with torch.onnx.export ...")
        self.graph = cap.capture(src.model, src.cm, src.inputs)

    def write(self, stage: Path) -> tuple[dict, list[str]]:
        """Write the flavours and libraries into stage; (manifest fields, files written)."""
        import onnx
        import onnxruntime

        job, cm = self.job, self.job.source.cm
        builders = {
            "custom": (custom.builder(job.activations), {custom.DOMAIN: custom.DOMAIN_VERSION}, custom.graph_pass),
            "stock": (stock.builder(), {}, None),
            "qonnx": (qonnx.builder(), {qonnx.DOMAIN: qonnx.DOMAIN_VERSION}, None),
        }
        artifacts, layers, own = {}, {}, []
        for flavour in self.flavours:
            if flavour in self.skipped:
                continue
            build, domains, graph_pass = builders[flavour]
            proto, infos = graph.rewrite(self.graph, cm, build, domains, graph_pass)
            (stage / FILES[flavour]).write_bytes(proto.SerializeToString())
            own.append(FILES[flavour])
            artifacts[FILES[flavour]] = {"flavour": flavour, "opset": cap.GRAPH_OPSET, "ir_version": proto.ir_version,
                                         "domains": {o.domain or "ai.onnx": o.version for o in proto.opset_import},
                                         "transposes": sum(n.op_type == "Transpose" for n in proto.graph.node)}
            for name, info in infos.items():
                layers.setdefault(name, {})[flavour] = info
            job.log(f"  {FILES[flavour]}: {(stage / FILES[flavour]).stat().st_size:,} bytes")
        lib_entries = {}
        for tname, lib in self.libs.items():
            dest = ort_library.copy_to(lib, stage / "lib" / tname / ort_library.LIB_NAME)
            lib_entries[tname] = str(dest.relative_to(stage))
            own.append(lib_entries[tname])
        shutil.copyfile(RUNNER, stage / "run_onnx.py")
        own.append("run_onnx.py")
        lib_info = {}
        if lib_entries:
            lib_info = {"files": lib_entries, "headers": ort_library.headers_info(), "domain": custom.DOMAIN,
                        "domain_version": custom.DOMAIN_VERSION,
                        "load": "SessionOptions.register_custom_ops_library('lib/<target>/libspfq_ort.so')",
                        "run": "python run_onnx.py model.spfq.onnx inputs.npz --library lib/<target>/libspfq_ort.so "
                               "-o outputs.npz (numpy + the target's onnxruntime)"}
            if job.host.name in lib_entries:
                lib_info["host_library_info"] = ort_library.library_info(stage / lib_entries[job.host.name])
        inputs = job.source.inputs
        fields = job.manifest_base("onnx", stage, {"onnx": onnx.__version__, "onnxruntime": onnxruntime.__version__})
        fields["inputs"]["dynamic_axes"] = {k: {str(a): v for a, v in ax.items()} for k, ax in inputs.dynamic_axes.items()}
        fields.update({
            "opset": cap.GRAPH_OPSET, "ir_version": cap.IR_VERSION,
            "stock_accuracy_level": "session.qdq_matmulnbits_accuracy_level: 0 = float (parity), 4 = int8 compute",
            "bit_packing": BIT_PACKING,
            "artifacts": artifacts, "custom_op_library": lib_info, "skipped": self.skipped,
            "layers": layers,
        })
        return fields, own
