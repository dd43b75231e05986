"""Compressed CNNs against the fp32 model and onnxruntime's own int8 quantiser, same run.

    python benchmarks/conv_latency.py --out benchmarks/results/conv_latency.json [--spfq-dir DIR]

Models (real weights, real inputs): the MNIST CNN at 1-bit / ternary / 4-bit (batch 1 and 64)
and MobileNetV2 (examples/mobilenetv2.py, 224x224) at 4-bit and ternary (batch 1), each
exported as the custom-op flavour (int8 activations, channels-last between compressed convs).
Peers in the same run: the fp32 ONNX model, and the model onnxruntime.quantization.
quantize_static makes from the same calibration images (QDQ, per-channel int8 weights, uint8
activations, MinMax calibration). Timing: spfq_deploy.bench.worker, one process per thread
count (1 and 2) with SPFQ_NUM_THREADS and ORT's intra-op threads set; medians.

Kernel rows: single PackedConv nodes (NHWC in and out, as they run between compressed convs)
vs one fp32 ONNX Conv at the same shape (NCHW, what onnxruntime runs), 4-bit weights, the
activation mode an int8 export gives the layer (depthwise: float, kernels.layer_activation),
1 thread. Roofline: roof = min(fp32 sgemm MAC/s measured here with numpy, copy
bandwidth x MACs per byte moved (fp32 input + output + packed weights)); fraction = achieved /
roof. Latency does not depend on which codes were chosen, so models are compressed with
round-to-nearest (quick); --spfq-dir reuses <dir>/<model>_<bits>.spfq files.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import examples.mnist_cnn as mnist  # noqa: E402
import examples.mobilenetv2 as mobilenet  # noqa: E402
from spfq_deploy import kernels as K  # noqa: E402
from spfq_deploy.atomic import write_text  # noqa: E402
from spfq_deploy.compress import compress_model  # noqa: E402
from spfq_deploy.compressed import CompressedLayer, CompressedModel  # noqa: E402
from spfq_deploy.export import export  # noqa: E402
from spfq_deploy.export.onnx.graph import float_graph  # noqa: E402
from spfq_deploy.export.source import export_inputs  # noqa: E402
from spfq_deploy.pack import container  # noqa: E402

GOALS = {"mnist": 0.8, "mobilenetv2": 0.75}  # custom ops / ORT fp32, issue 15
MODELS = {  # label: (module file, module, bit settings, batches)
    "mnist": ("examples/mnist_cnn.py", mnist, [1, "ternary", 4], [1, 64]),
    "mobilenetv2": ("examples/mobilenetv2.py", mobilenet, [4, "ternary"], [1]),
}
KERNEL_SHAPES = {  # name: (C in, N out, kernel, stride, groups, H = W)
    "depthwise 3x3 112x112x32": (32, 32, 3, 1, 32, 112),
    "depthwise 3x3 14x14x576": (576, 576, 3, 1, 576, 14),
    "pointwise 56x56 24->144": (24, 144, 1, 1, 1, 56),
    "first conv 3x3x3 s2 224x224": (3, 32, 3, 2, 1, 224),
}


def _compressed(label, module_file, module, bits, work: Path, spfq_dir: Path | None, calib) -> tuple[Path, str]:
    name = f"{label}_{bits}.spfq"
    if spfq_dir is not None and (spfq_dir / name).is_file():
        return spfq_dir / name, container.load(spfq_dir / name).meta.get("config", {}).get("method", "file")
    res = compress_model(module.build(), calib, bits=bits, method="rtn", progress=False, model_spec=module_file)
    container.save(work / name, res.model)
    return work / name, "rtn"


def _qdq(fp32: Path, out: Path, calib: np.ndarray, input_name: str) -> Path:
    """onnxruntime's static int8 quantisation of the fp32 model from the same calibration images."""
    from onnxruntime.quantization import CalibrationDataReader, QuantFormat, QuantType, quantize_static
    from onnxruntime.quantization.shape_inference import quant_pre_process

    class Reader(CalibrationDataReader):
        def __init__(self):
            self.rows = iter(calib[i:i + 1] for i in range(len(calib)))

        def get_next(self):
            x = next(self.rows, None)
            return None if x is None else {input_name: x}

    pre = out.with_suffix(".pre.onnx")
    quant_pre_process(str(fp32), str(pre), skip_symbolic_shape=True)
    quantize_static(str(pre), str(out), Reader(), quant_format=QuantFormat.QDQ, per_channel=True,
                    activation_type=QuantType.QUInt8, weight_type=QuantType.QInt8)
    return out


def _time(artifacts: list[dict], inputs: Path, batches, threads: int, warmup: int, repeat: int) -> list[dict]:
    plan = {"threads": threads, "batches": list(batches), "warmup": warmup, "repeat": repeat,
            "inputs": str(inputs), "artifacts": artifacts}
    with tempfile.NamedTemporaryFile("w", suffix=".json", delete=False) as f:
        json.dump(plan, f)
    env = dict(os.environ, SPFQ_NUM_THREADS=str(threads), OMP_NUM_THREADS=str(threads))
    try:
        r = subprocess.run([sys.executable, "-m", "spfq_deploy.bench.worker", f.name], capture_output=True,
                           text=True, env=env, timeout=3600)
    finally:
        os.unlink(f.name)
    lines = [ln for ln in r.stdout.splitlines() if ln.startswith("{")]
    if r.returncode or not lines:
        raise RuntimeError(f"timing process failed: {r.stderr.strip().splitlines()[-1:]}")
    return json.loads(lines[-1])["rows"]


def bench_models(work: Path, spfq_dir, threads_list, warmup, repeat, log) -> list[dict]:
    rows = []
    for label, (module_file, module, bit_list, batches) in MODELS.items():
        inputs = export_inputs(module, getattr(module, "calibration", None))
        fp32 = work / f"{label}_fp32.onnx"
        fp32.write_bytes(float_graph(module.build(), inputs).SerializeToString())
        calib = module.calibration(64)
        name = inputs.input_names[0]
        qdq = _qdq(fp32, work / f"{label}_qdq.onnx", calib.numpy(), name)
        feeds = work / f"{label}_inputs.npz"
        x = mnist.load_digits()[0][:64].numpy() if label == "mnist" else mobilenet.held_out(2).numpy()
        np.savez(feeds, **{name: x})
        arts = [{"name": "fp32", "path": str(fp32), "runtime": "onnxruntime"},
                {"name": "ort_qdq_int8", "path": str(qdq), "runtime": "onnxruntime"}]
        sizes = {"fp32": fp32.stat().st_size, "ort_qdq_int8": qdq.stat().st_size}
        for bits in bit_list:
            spfq, method = _compressed(label, module_file, module, bits, work, spfq_dir, calib)
            out = work / f"{label}_{bits}"
            export(spfq, out, flavours=("custom",), log=lambda *a: None)
            lib = next((out / "lib").rglob("libspfq_ort.so"))
            arts.append({"name": f"custom_{bits}", "path": str(out / "model.spfq.onnx"), "library": str(lib),
                         "runtime": "onnxruntime", "compressed_with": method})
            sizes[f"custom_{bits}"] = (out / "model.spfq.onnx").stat().st_size
        for t in threads_list:
            timed = _time(arts, feeds, batches, t, warmup, repeat)
            base = {r["batch"]: r["median_ms"] for r in timed if r["artifact"] == "fp32" and "median_ms" in r}
            qd = {r["batch"]: r["median_ms"] for r in timed if r["artifact"] == "ort_qdq_int8" and "median_ms" in r}
            for r in timed:
                if "median_ms" in r:
                    r["ratio_vs_fp32"] = r["median_ms"] / base[r["batch"]]
                    r["ratio_vs_ort_qdq_int8"] = r["median_ms"] / qd[r["batch"]]
                r.update(model=label, bytes=sizes.get(r["artifact"]))
                log(f"{label:12s} {r['artifact']:14s} batch {r.get('batch')} threads {t}: "
                    + (f"{r['median_ms']:.2f} ms ({r['ratio_vs_fp32']:.2f}x fp32, "
                       f"{r['ratio_vs_ort_qdq_int8']:.2f}x ORT int8)" if "median_ms" in r else r.get("error", "")))
            rows += timed
    return rows


def _random_layer(c, n, k, s, groups, bits=4) -> CompressedLayer:
    rng = np.random.default_rng(0)
    d = c // groups * k * k
    K_ = 2 ** (bits - 1) - 1
    conv = {"kernel_size": [k, k], "stride": [s, s], "padding": [k // 2] * 2, "dilation": [1, 1], "groups": groups}
    return CompressedLayer(name="L", kind="conv2d", weight_shape=(n, c // groups, k, k), alphabet="int", bits=bits,
                           codes=rng.integers(-K_, K_ + 1, (n, d)).astype(np.int8),
                           scale=np.full(n, 0.01, np.float32), lam=None, bias=np.zeros(n, np.float32), conv=conv)


def _roof(work: Path) -> dict:
    """This machine's fp32 MAC/s (numpy sgemm, 1 thread) and copy bandwidth (bytes/s)."""
    a = np.random.default_rng(0).standard_normal((1024, 1024)).astype(np.float32)
    a @ a
    t = time.perf_counter()
    for _ in range(5):
        a @ a
    macs = 5 * 1024 ** 3 / (time.perf_counter() - t)
    big = np.ones(64 << 20, np.float32)
    dst = np.empty_like(big)
    np.copyto(dst, big)
    t = time.perf_counter()
    for _ in range(5):
        np.copyto(dst, big)
    bw = 5 * 2 * big.nbytes / (time.perf_counter() - t)
    return {"fp32_macs_per_s": macs, "copy_bytes_per_s": bw}


def bench_kernels(work: Path, warmup, repeat, log) -> tuple[list[dict], dict]:
    import onnx
    from onnx import TensorProto, helper, numpy_helper

    from spfq_deploy.export.onnx import capture as cap
    from spfq_deploy.export.onnx import custom, ort_library
    from spfq_deploy.export.onnx import graph as onnx_graph
    from spfq_deploy.targets import host_target

    lib = ort_library.build(host_target())
    roof = _roof(work)
    rows = []
    for name, (c, n, k, s, groups, hw) in KERNEL_SHAPES.items():
        layer = _random_layer(c, n, k, s, groups)
        oh = (hw + 2 * (k // 2) - k) // s + 1
        marker = helper.make_node("Layer", ["x"], ["y"], domain=cap.CAPTURE_DOMAIN)
        marker.attribute.append(helper.make_attribute("name", "L"))
        g = helper.make_graph([marker], "k", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, hw, hw])],
                              [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n, oh, oh])])
        cm = CompressedModel(layers={"L": layer}, float_params={})
        packed, _ = onnx_graph.rewrite(helper.make_model(g), cm, custom.builder("int8"), {custom.DOMAIN: 1},
                                       custom.graph_pass)
        conv = next(nd for nd in packed.graph.node if nd.op_type == "PackedConv")  # the NHWC node alone
        act = helper.get_attribute_value(next(a for a in conv.attribute if a.name == "activation")).decode()
        g2 = helper.make_graph([conv], "k", [helper.make_tensor_value_info(conv.input[0], TensorProto.FLOAT,
                                                                           [1, hw, hw, c])],
                               [helper.make_tensor_value_info(conv.output[0], TensorProto.FLOAT, [1, oh, oh, n])],
                               initializer=list(packed.graph.initializer))
        m2 = helper.make_model(g2, opset_imports=list(packed.opset_import))
        m2.ir_version = packed.ir_version
        w = numpy_helper.from_array(layer.dequantize(), "w")
        fconv = helper.make_node("Conv", ["x", "w"], ["y"], kernel_shape=[k, k], strides=[s, s],
                                 pads=[k // 2] * 4, group=groups)
        g3 = helper.make_graph([fconv], "f", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, c, hw, hw])],
                               [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, n, oh, oh])],
                               initializer=[w])
        m3 = helper.make_model(g3, opset_imports=[helper.make_opsetid("", 21)])
        m3.ir_version = packed.ir_version
        tag = name.split()[0] + str(len(rows))
        p_packed, p_fp32 = work / f"k_{tag}.onnx", work / f"kf_{tag}.onnx"
        onnx.save(m2, p_packed)
        onnx.save(m3, p_fp32)
        x = np.random.default_rng(1).standard_normal((1, c, hw, hw)).astype(np.float32)
        for path, feed, art in ((p_fp32, x, "ort_fp32_conv"),
                                (p_packed, np.ascontiguousarray(x.transpose(0, 2, 3, 1)), f"packed_conv_4bit_{act}")):
            npz = work / f"in_{tag}_{art}.npz"
            np.savez(npz, **{("x" if art == "ort_fp32_conv" else conv.input[0]): feed})
            r = _time([{"name": art, "path": str(path), "library": str(lib), "runtime": "onnxruntime"}], npz, [1], 1,
                      warmup, repeat)[0]
            macs = oh * oh * n * (c // groups) * k * k
            moved = 4 * (c * hw * hw + n * oh * oh) + int(np.ceil(layer.codes.size * 4 / 8))
            r.update(kernel=name, macs=macs, bytes_moved=moved)
            if "median_ms" in r:
                achieved = macs / (r["median_ms"] / 1e3)
                roof_macs = min(roof["fp32_macs_per_s"], roof["copy_bytes_per_s"] * macs / moved)
                r.update(gmacs_per_s=achieved / 1e9, roof_gmacs_per_s=roof_macs / 1e9,
                         roofline_fraction=achieved / roof_macs)
            rows.append(r)
        a, b = rows[-2], rows[-1]
        if "median_ms" in a and "median_ms" in b:
            b["ratio_vs_ort_fp32_conv"] = b["median_ms"] / a["median_ms"]
            log(f"kernel {name:30s} ORT fp32 {a['median_ms']:.3f} ms, packed {b['median_ms']:.3f} ms "
                f"({b['ratio_vs_ort_fp32_conv']:.2f}x), roofline {b['roofline_fraction']:.2f}")
    return rows, roof


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", default="benchmarks/results/conv_latency.json")
    ap.add_argument("--spfq-dir", type=Path, help="reuse <dir>/<model>_<bits>.spfq when present")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--warmup", type=int, default=5)
    ap.add_argument("--repeat", type=int, default=30)
    ap.add_argument("--skip-models", action="store_true", help="kernel rows only")
    ap.add_argument("--isa", help="pin the kernels' ISA (SPFQ_ISA: avx2, avx512, amx, c) in every runtime")
    args = ap.parse_args(argv)
    if args.isa:  # before the library is loaded here; the timing processes inherit it
        os.environ["SPFQ_ISA"] = args.isa
        if K.lib().spfq_set_isa(args.isa.encode()):
            raise SystemExit(f"conv_latency: this CPU has no {args.isa!r} kernels")
        K.set_isa("auto")
    torch.set_num_threads(1)
    t0, load0 = time.perf_counter(), os.getloadavg()
    with tempfile.TemporaryDirectory(prefix="spfq-conv-") as tmp:
        work = Path(tmp)
        krows, roof = bench_kernels(work, args.warmup, args.repeat, print)
        rows = [] if args.skip_models else bench_models(
            work, args.spfq_dir, [int(t) for t in args.threads.split(",")], args.warmup, args.repeat, print)
    goals = []
    for r in rows:
        if r["artifact"].startswith("custom_") and "median_ms" in r and r["threads"] == 1:
            goal = GOALS[r["model"]]
            met = r["ratio_vs_fp32"] <= goal and (r["model"] != "mobilenetv2" or r["ratio_vs_ort_qdq_int8"] <= 1.0)
            goals.append({"model": r["model"], "artifact": r["artifact"], "batch": r["batch"],
                          "ratio_vs_fp32": r["ratio_vs_fp32"], "ratio_vs_ort_qdq_int8": r["ratio_vs_ort_qdq_int8"],
                          "goal_vs_fp32": goal, "met": met})
            print(f"goal: {r['model']} {r['artifact']} batch {r['batch']}: {r['ratio_vs_fp32']:.2f}x fp32 "
                  f"(<= {goal}x), {r['ratio_vs_ort_qdq_int8']:.2f}x ORT int8: {'met' if met else 'MISSED'}")
    import onnxruntime

    doc = {"machine": {"cpu": platform.processor() or platform.machine(), "cores": os.cpu_count(),
                       "isa": K.isa(), "load_avg_before": list(load0), "load_avg_after": list(os.getloadavg()),
                       "onnxruntime": onnxruntime.__version__, "torch": torch.__version__},
           "roof": roof, "warmup": args.warmup, "repeat": args.repeat, "kernel_rows": krows, "rows": rows,
           "goals": goals, "wall_s": time.perf_counter() - t0}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
