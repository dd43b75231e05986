"""The bench plan and document: which artifacts of an export folder run on this host, the fp32
baseline (the uncompressed model of the folder's model factory as plain ONNX:
export.capture.float_graph), one worker process per thread count, ratios against fp32.

Artifacts come from the validate discovery (validate.runners.discover): the ONNX custom-op model
with the host's lib/<host>/libspfq_ort.so, the stock model at accuracy level 0 (float) and 4 (int8
compute, what onnxruntime picks on its own), and the TVM library model.<host>.so. Not timed: QONNX
(a numpy node-by-node executor, not a runtime) and libraries for other targets (arm64 runs here
only under qemu emulation, whose timings mean nothing).
"""

from __future__ import annotations

import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

from ..errors import SpfqError
from ..validate import runners
from ..validate.core import HOST, MANIFESTS, _read_manifest

FP32 = "fp32"


def _name(art) -> str:
    if art.flavour == "custom":
        return "onnx_custom"
    if art.flavour == "stock":
        return f"onnx_stock_acc{art.accuracy_level}"
    return f"tvm_{art.target}"


def _model_spec(out: Path, manifests: list[dict]) -> str:
    for m in manifests:
        spec = (m.get("source") or {}).get("model_spec")
        if spec:
            return spec
    from ..pack import container

    try:
        return container.read_header(out / "model.spfq")["model_spec"]
    except Exception as exc:
        raise SpfqError(f"{out}: no model factory in the manifests or model.spfq ({exc})") from None


def fp32_onnx(spec: str, path: Path) -> Path:
    """The uncompressed model of the factory as plain ONNX, traced like the export traces it."""
    from ..export.onnx.graph import float_graph
    from ..export.source import export_inputs
    from ..modelspec import load_model

    model, module = load_model(spec)
    inputs = export_inputs(module, getattr(module, "calibration", None), model)
    path.write_bytes(float_graph(model, inputs).SerializeToString())
    return path


def plan_artifacts(out: Path, target: str) -> tuple[list[dict], list[dict]]:
    """(artifacts to time, [{artifact, target, why}] of those left out)."""
    onnx_m, tvm_m, cuda_m = (_read_manifest(out / m) for m in MANIFESTS)
    if onnx_m is None and tvm_m is None and cuda_m is None:
        raise SpfqError(f"{out}: no {', '.join(MANIFESTS)} (not an spfq-deploy export folder)")
    names = list(((onnx_m or tvm_m or cuda_m).get("inputs") or {}).get("names", []))
    timed, left = [], []
    for art in runners.discover(out, onnx_m, tvm_m, HOST, cuda_m):
        if art.flavour == "cuda":
            left.append({"artifact": art.label, "target": art.target,
                         "why": "GPU kernels: timed by benchmarks/cuda_gemm.py against torch fp16 / fp32"})
            continue
        if art.flavour == "qonnx":
            left.append({"artifact": art.label, "target": art.target,
                         "why": "the qonnx executor runs node by node in numpy: not a deployment runtime"})
            continue
        if art.target != target:
            left.append({"artifact": art.label, "target": art.target,
                         "why": f"built for {art.target}: not timed on this {HOST} host "
                                f"(under emulation a timing means nothing)"})
            continue
        if art.skip:
            left.append({"artifact": art.label, "target": art.target, "why": art.skip})
            continue
        entry = {"name": _name(art), "label": art.label, "file": art.file, "target": art.target,
                 "path": str(out / art.file), "runtime": "tvm" if art.flavour == "tvm" else "onnxruntime",
                 "input_names": list(((tvm_m or {}).get("inputs") or {}).get("names", names))}
        if art.library:
            entry["library"] = str(out / art.library)
        if art.accuracy_level is not None:
            entry["accuracy_level"] = art.accuracy_level
        timed.append(entry)
    return timed, left


def bench(out_dir: str | Path, target: str | None = None, batches=(1, 8), threads=(1,), warmup: int = 3,
          repeat: int = 20, log=print) -> dict:
    out = Path(out_dir)
    if not out.is_dir():
        raise SpfqError(f"{out}: no such export folder")
    target = target or HOST
    if target != HOST:
        raise SpfqError(f"--target {target}: this host is {HOST}; only its artifacts can be timed here "
                        f"(arm64 libraries run here only under qemu emulation)")
    if not (out / "inputs.npz").is_file():
        raise SpfqError(f"{out}/inputs.npz is missing")
    with np.load(out / "inputs.npz", allow_pickle=False) as z:
        input_shapes = {k: list(z[k].shape) for k in z.files}
    arts, left = plan_artifacts(out, target)
    manifests = [m for m in (_read_manifest(out / x) for x in MANIFESTS) if m]
    spec = _model_spec(out, manifests)
    load_before = os.getloadavg()
    t0 = time.perf_counter()
    rows = []
    with tempfile.TemporaryDirectory(prefix="spfq-bench-") as tmp:
        tmp = Path(tmp)
        try:
            fp32 = fp32_onnx(spec, tmp / "fp32.onnx")
        except SpfqError:
            raise
        except Exception as exc:
            raise SpfqError(f"{spec}: cannot build the fp32 baseline ({str(exc).splitlines()[0]})") from None
        all_arts = [{"name": FP32, "label": "onnxruntime fp32 (uncompressed model)", "file": None, "target": HOST,
                     "path": str(fp32), "runtime": "onnxruntime", "input_names": list(input_shapes)}] + arts
        for t in threads:
            log(f"timing {len(all_arts)} runners x batches {list(batches)} with {t} thread{'s' if t > 1 else ''} ...")
            plan = {"threads": t, "batches": list(batches), "warmup": warmup, "repeat": repeat,
                    "inputs": str(out / "inputs.npz"), "artifacts": all_arts}
            (tmp / "plan.json").write_text(json.dumps(plan))
            env = dict(os.environ, SPFQ_NUM_THREADS=str(t), TVM_NUM_THREADS=str(t), OMP_NUM_THREADS=str(t))
            r = subprocess.run([sys.executable, "-m", "spfq_deploy.bench.worker", str(tmp / "plan.json")],
                               capture_output=True, text=True, env=env, timeout=1800)
            lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
            if r.returncode != 0 or not lines:
                err = [ln for ln in r.stderr.strip().splitlines() if ln.strip()]
                raise SpfqError(f"the timing process ({t} threads) failed: {err[-1] if err else r.returncode}")
            rows += json.loads(lines[-1])["rows"]
    base = {(r["batch"], r["threads"]): r["median_ms"] for r in rows
            if r["artifact"] == FP32 and "median_ms" in r}
    for r in rows:
        b = base.get((r.get("batch"), r["threads"]))
        if "median_ms" in r and b:
            r["ratio_vs_fp32"] = r["median_ms"] / b
            r["speedup_vs_fp32"] = b / r["median_ms"]
    import onnxruntime

    for a in all_arts:
        a.pop("path", None), a.pop("library", None)
    return {"folder": str(out), "host": HOST, "target": target, "model_spec": spec,
            "baseline": "onnxruntime fp32: the uncompressed model of the factory, exported with "
                        "spfq_deploy.export.onnx.graph.float_graph",
            "inputs": {"file": str(out / "inputs.npz"), "shapes": input_shapes,
                       "batching": "rows repeated / cut to the batch size along axis 0"},
            "batches": list(batches), "threads": list(threads), "warmup": warmup, "repeat": repeat,
            "artifacts": all_arts, "not_timed": left, "rows": rows,
            "machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                        "load_avg_before": list(load_before), "load_avg_after": list(os.getloadavg()),
                        "python": platform.python_version(), "onnxruntime": onnxruntime.__version__},
            "wall_s": time.perf_counter() - t0}


def table(doc: dict) -> str:
    """One line per artifact x batch x threads: median, p10-p90, ratio to fp32."""
    from ..tables import render

    labels = {a["name"]: a["label"] for a in doc["artifacts"]}
    body = []
    for r in sorted(doc["rows"], key=lambda r: (r["threads"], r.get("batch") or 0)):
        if "median_ms" in r:
            body.append([r["artifact"], r["batch"], r["threads"], f"{r['median_ms']:.3f}",
                         f"{r['p10_ms']:.3f} - {r['p90_ms']:.3f}",
                         f"{r['ratio_vs_fp32']:.2f}x" if "ratio_vs_fp32" in r else "-"])
        else:
            body.append([r["artifact"], r.get("batch", "-"), r["threads"], "error", r.get("error", ""), "-"])
    lines = [render(["runner", "batch", "threads", "median ms", "p10 - p90 ms", "vs fp32"], body, "lrrrrr"), ""]
    lines += [f"{n}: {labels[n]}" for n in labels]
    lines += [f"not timed: {x['artifact']} @ {x['target']}: {x['why']}" for x in doc["not_timed"]]
    m = doc["machine"]
    lines.append(f"{doc['warmup']} warm-up + {doc['repeat']} timed calls per cell; {m['cores']} cores, "
                 f"load average {m['load_avg_before'][0]:.2f} before / {m['load_avg_after'][0]:.2f} after")
    return "\n".join(lines)
