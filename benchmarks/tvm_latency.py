"""End-to-end latency of the TVM export on the x86_64 host vs TVM-compiled fp32 vs onnxruntime fp32.

    python benchmarks/tvm_latency.py --out benchmarks/results/tvm_latency.json

MiniLM encoder (batch 1 x 128 real tokens) with 1-bit and ternary Linear layers, the MNIST CNN
(batch 1 and 64 real digits) at 1-bit and MobileNetV2 (batch 1, a 224x224 held-out photo) at
4-bit and ternary, all in one process:
  tvm_int8 / tvm_float   model.x86_64.so of `export --format tvm` (packed C kernels; int8 or
                         float activations)
  tvm_fp32               the uncompressed model through the same pipeline (torch.export ->
                         Relax -> tvm.compile for the same target dict -> export_library), no
                         packed layer (tvm_compile.float_library)
  ort_fp32               the uncompressed model as plain ONNX in onnxruntime
One thread everywhere (SPFQ_NUM_THREADS, TVM_NUM_THREADS, ORT intra-op threads). The runners
are timed in `--rounds` interleaved rounds (warm-up, then `--repeat` calls each; timeit from
onnx_latency.py) so that load on this shared machine hits them alike: medians over all samples,
ratios the median of the per-round ratios. Each row records the smallest row cosine of each
runner's output against what it must compute (PyTorch fp32; the dequantised model for float
activations; the integer reference for int8 activations), so every timing is of a correct
computation, and a per-function profile of the int8 library (Relax VM instrument hook: Python
overhead per call included, so shares, not absolute times). `goals`: the int8 export against
onnxruntime fp32 (issue 15: <= 1.0x). TVM's float part is compiled for the target dict as is
(the generic x86-64 one: SSE2; `tvm_vector_lanes`); the kernels pick their ISA at run time
(`isa`).
arm64 libraries run here only under qemu-user emulation: their timings are not meaningful and
are not reported.
"""

from __future__ import annotations

import os

# before tvm / the kernels start their thread pools
os.environ["SPFQ_NUM_THREADS"] = "1"
os.environ["TVM_NUM_THREADS"] = "1"

import argparse  # noqa: E402
import json  # noqa: E402
import platform  # noqa: E402
import sys  # noqa: E402
import tempfile  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import numpy as np  # noqa: E402
import torch  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from onnx_latency import compressed, minilm_tokens, timeit  # noqa: E402

import examples.minilm as minilm  # noqa: E402
import examples.mnist_cnn as mnist  # noqa: E402
import examples.mobilenetv2 as mobilenet  # noqa: E402
from spfq_deploy import kernels as K  # noqa: E402
from spfq_deploy.atomic import write_text  # noqa: E402
from spfq_deploy.export import export  # noqa: E402
from spfq_deploy.export.onnx.graph import float_graph  # noqa: E402
from spfq_deploy.export.onnx.session import session  # noqa: E402
from spfq_deploy.export.source import export_inputs  # noqa: E402
from spfq_deploy.export.tvm import compile as tvm_compile  # noqa: E402
from spfq_deploy.export.tvm import runtime as tvm_runtime  # noqa: E402
from spfq_deploy.export.tvm import schedule  # noqa: E402
from spfq_deploy.pack import container  # noqa: E402
from spfq_deploy.reference import int8_activation_reference, load_reference  # noqa: E402
from spfq_deploy.targets import get_target  # noqa: E402

GOAL_VS_ORT_FP32 = 1.0
PROFILE_TOP = 12


def _cos(a: np.ndarray, b: np.ndarray) -> float:
    a, b = a.reshape(len(a), -1).astype(np.float64), b.reshape(len(b), -1).astype(np.float64)
    return float(((a * b).sum(1) / (np.linalg.norm(a, axis=1) * np.linalg.norm(b, axis=1)).clip(1e-30)).min())


def vm_profile(lib, tensors, runs: int = 10) -> dict:
    """{function: ms per run} of the library's main, largest first: each VM call instruction
    timed through the VM's instrument hook (a fresh VM, so the timed one stays unhooked)."""
    import tvm
    from tvm.runtime.vm import VirtualMachine

    vm, spent, started = VirtualMachine(lib, tvm.cpu()), {}, {}

    def hook(_func, name, before, _ret, *_args):
        if before:
            started[name] = time.perf_counter()
        else:
            spent[name] = spent.get(name, 0.0) + time.perf_counter() - started[name]
        return 0

    vm["main"](*tensors)
    vm.set_instrument(hook)
    for _ in range(runs):
        vm["main"](*tensors)
    top = sorted(spent.items(), key=lambda kv: -kv[1])[:PROFILE_TOP]
    return {name: round(s * 1e3 / runs, 4) for name, s in top}


def time_rounds(calls: dict, warmup: int, repeat: int, rounds: int) -> dict:
    """Every runner timed `rounds` times, interleaved; medians over all samples, and per round."""
    per_round = {k: [] for k in calls}
    samples = {k: [] for k in calls}
    for _ in range(rounds):
        for k, fn in calls.items():
            r = timeit(fn, warmup, repeat)
            per_round[k].append(r["median_ms"])
            samples[k].append(r)
    out = {}
    for k in calls:
        meds = per_round[k]
        out[k] = {"median_ms": float(np.median(meds)), "round_medians_ms": meds,
                  "p10_ms": float(np.median([s["p10_ms"] for s in samples[k]])),
                  "p90_ms": float(np.median([s["p90_ms"] for s in samples[k]])), "samples": repeat * rounds}
    for k in calls:
        for base in ("tvm_fp32", "ort_fp32"):
            ratios = [a / b for a, b in zip(per_round[k], per_round[base])]
            out[k][f"ratio_vs_{base}"] = float(np.median(ratios))
    return out


def bench_model(label, module_file, module, feeds_by_case, bits_list, work, spfq_dir, args, log):
    import tvm

    rows = []
    inputs = export_inputs(module, getattr(module, "calibration", None))
    fp32_onnx = work / f"{label}_fp32.onnx"
    fp32_onnx.write_bytes(float_graph(module.build(), inputs).SerializeToString())
    t0 = time.perf_counter()
    fp32_so = tvm_compile.float_library(module.build(), inputs, work / f"{label}_fp32.so", log=lambda *a: None)
    log(f"{label}: TVM fp32 compiled in {time.perf_counter() - t0:.0f} s")
    calib = module.calibration(16) if label == "minilm" else module.calibration(64)
    base = {"ort_fp32": session(fp32_onnx), "tvm_fp32": tvm_runtime.load(fp32_so)[0]}
    for bits in bits_list:
        spfq, method = compressed(label, module_file, module.build, calib, bits, work, spfq_dir)
        libs, export_s = {}, {}
        for act in ("int8", "float"):
            out = work / f"{label}_{bits}_{act}"
            t0 = time.perf_counter()
            export(spfq, out, formats=("tvm",), target="x86_64", activations=act, log=lambda *a: None)
            export_s[f"tvm_{act}"] = round(time.perf_counter() - t0, 1)
            libs[f"tvm_{act}"] = out / tvm_runtime.library_name("x86_64")
        ref = load_reference(spfq)
        ref8 = int8_activation_reference(ref, container.load(spfq))
        runners, modules = dict(base), {}
        for k, path in libs.items():
            runners[k], modules[k] = tvm_runtime.load(path)
        for case, feeds in feeds_by_case.items():
            arrays = list(feeds.values())
            tensors = [tvm.runtime.tensor(np.ascontiguousarray(a)) for a in arrays]
            calls = {"ort_fp32": lambda s=runners["ort_fp32"]: s.run(None, feeds)}
            for k in ("tvm_fp32", "tvm_int8", "tvm_float"):
                calls[k] = lambda vm=runners[k]: vm["main"](*tensors)
            # what each runner must compute: the fp32 model; the dequantised model (float
            # activations); the integer reference (int8 activations)
            targs = [torch.from_numpy(a) for a in arrays]
            with torch.no_grad():
                want = {"ort_fp32": module.build()(*targs).numpy(), "tvm_float": ref(*targs).numpy(),
                        "tvm_int8": ref8(*targs).numpy()}
            want["tvm_fp32"] = want["ort_fp32"]
            res = time_rounds(calls, args.warmup, args.repeat, args.rounds)
            for k in calls:
                got = runners[k].run(None, feeds)[0] if k == "ort_fp32" else tvm_runtime.run(runners[k], *arrays)[0]
                res[k]["cos_vs_reference_min"] = _cos(got, want[k])
            row = {"model": label, "bits": bits, "compressed_with": method, "case": case,
                   "load_avg_after": os.getloadavg(), "results": res, "export_s": export_s,
                   "profile_tvm_int8_ms": vm_profile(modules["tvm_int8"], tensors),
                   "sizes_bytes": {"tvm_fp32": fp32_so.stat().st_size, "ort_fp32": fp32_onnx.stat().st_size,
                                   **{k: p.stat().st_size for k, p in libs.items()}}}
            rows.append(row)
            log(f"{label:11s} {str(bits):8s} {case:8s} " + "  ".join(
                f"{k} {r['median_ms']:.2f} ms" for k, r in res.items())
                + f"  int8 {res['tvm_int8']['ratio_vs_ort_fp32']:.2f}x ORT  (load {os.getloadavg()[0]:.2f})")
    return rows


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/tvm_latency.json")
    ap.add_argument("--spfq-dir", type=Path, help="reuse <dir>/{minilm,mnist,mobilenetv2}_<bits>.spfq when present")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=20)
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--models", default="minilm,mnist,mobilenetv2")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import onnxruntime
    import tvm
    import tvm_ffi

    t0 = time.perf_counter()
    load_before = os.getloadavg()
    models = args.models.split(",")
    rows = []
    with tempfile.TemporaryDirectory() as tmp:
        work = Path(tmp)
        if "minilm" in models:
            rows += bench_model("minilm", "examples/minilm.py", minilm, {"1x128": minilm_tokens(128)},
                                [1, "ternary"], work, args.spfq_dir, args, print)
        if "mnist" in models:
            digits = mnist.load_digits()[0].numpy()
            rows += bench_model("mnist", "examples/mnist_cnn.py", mnist,
                                {"batch1": {"input": digits[:1]}, "batch64": {"input": digits[:64]}},
                                [1], work, args.spfq_dir, args, print)
        if "mobilenetv2" in models:
            photo = mobilenet.held_out(1).numpy()
            rows += bench_model("mobilenetv2", "examples/mobilenetv2.py", mobilenet, {"batch1": {"image": photo}},
                                [4, "ternary"], work, args.spfq_dir, args, print)
    goals = []
    for r in rows:
        ratio = r["results"]["tvm_int8"]["ratio_vs_ort_fp32"]
        met = ratio <= GOAL_VS_ORT_FP32
        goals.append({"model": r["model"], "artifact": f"tvm_int8_{r['bits']}", "case": r["case"],
                      "ratio_vs_ort_fp32": ratio, "goal_vs_ort_fp32": GOAL_VS_ORT_FP32, "met": met})
        print(f"goal: {r['model']} tvm int8 {r['bits']} {r['case']}: {ratio:.2f}x ORT fp32 "
              f"(<= {GOAL_VS_ORT_FP32}x): {'met' if met else 'MISSED'}")
    target = get_target("x86_64")
    doc = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(), "isa": K.isa(),
                       "load_avg_before": load_before, "load_avg_after": os.getloadavg(),
                       "onnxruntime": onnxruntime.__version__, "tvm": tvm.__version__, "tvm_ffi": tvm_ffi.__version__,
                       "torch": torch.__version__},
           "target": "x86_64", "tvm_target": dict(target.tvm),
           "tvm_vector_lanes": schedule.vector_lanes(tvm_compile.tvm_target(target)),
           "threads": 1, "warmup": args.warmup, "repeat": args.repeat, "rounds": args.rounds, "rows": rows,
           "goals": goals, "arm64": "not timed: the arm64 libraries run here only under qemu-user emulation",
           "wall_s": time.perf_counter() - t0}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
