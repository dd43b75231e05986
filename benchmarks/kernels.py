"""Kernel benchmark: the project's packed GEMM kernels against onnxruntime, side by side.

    python benchmarks/kernels.py [--threads 1] [--shapes quick|full] [--scaling]
                                 [--out benchmarks/results/kernels.json]

One process, one thread count (onnxruntime intra_op_num_threads, torch threads and the kernels'
`threads` argument all set to --threads; --scaling adds 2-thread entries for M >= 16 in the same
process). For every shape (M, N, K) it times, interleaved round by round so the noise of this
shared 2-core machine hits every entry alike:
- onnxruntime fp32 MatMul (one-node model, weight as an initializer),
- onnxruntime com.microsoft.MatMulNBits, bits 2 / 4, block_size 32 / 64, accuracy_level 4 / 0,
- the project's kernels through the ctypes binding: 1-bit x int8 (sign), XNOR/popcount (bgemm),
  ternary x int8 (sign_mask), 2-bit and 4-bit x int8 (planes), 4-bit 50%-sparse x int8 (sparse),
  4-bit x float (planes, matmul_f32),
- the activation quantisers (quantize_i8, binarize) so float-in/float-out costs can be quoted.
A kernel the library does not have yet ("not supported") is recorded as missing with the reason.

Every ratio is taken between entries of this same run (medians). Goals come from PERF.md and are
judged on the conservative basis: kernel + activation quantiser vs onnxruntime (which also takes
float input); the kernel-only ratio is reported next to it. GB/s counts the packed weight bytes
(plus scales); the roofline anchor is a plain streaming read (numpy / torch sum) of the same
number of bytes at the same thread count, measured in the same run.

Notes: `session.qdq_matmulnbits_accuracy_level` only steers the DequantizeLinear+MatMul ->
MatMulNBits fusion; these models hold MatMulNBits nodes directly, whose own accuracy_level
attribute decides, so the option is not set here. MatMulNBits packing is verified once per run
against a numpy dequantised reference (acc=0 tight, acc=4 within int8-activation error).
"""

from __future__ import annotations

import argparse
import datetime as _dt
import gc
import json
import os
import platform
import sys
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spfq_deploy import kernels as K  # noqa: E402
from spfq_deploy.atomic import write_text  # noqa: E402
from spfq_deploy.compressed import CompressedLayer  # noqa: E402
from spfq_deploy.pack import layouts as L  # noqa: E402

SCHEMA = "spfq-kernel-bench/1"

# ------------------------------------------------------------------------------ configuration

QUICK_SHAPES = [(1, 4096, 4096), (64, 4096, 4096)]  # (M, N, K)


def full_shapes() -> list[tuple[int, int, int]]:
    """M in {1, 16, 128} x (K = N in {1024, 4096}, (N, K) = (11008, 4096)), plus M = 64 at 4096^2
    (the shape of the XNOR goal)."""
    out = []
    for n, k in ((1024, 1024), (4096, 4096), (11008, 4096)):
        ms = (1, 16, 64, 128) if (n, k) == (4096, 4096) else (1, 16, 128)
        out += [(m, n, k) for m in ms]
    return out


MODES = {  # repeats cap, seconds of timing per entry, longest call worth timing
    "quick": {"repeats": 20, "budget_s": 0.35, "skip_call_s": 1.0},
    "full": {"repeats": 30, "budget_s": 1.0, "skip_call_s": 5.0},
}

MNB_BITS, MNB_BLOCKS, MNB_ACC = (2, 4), (32, 64), (4, 0)


@dataclass(frozen=True)
class SpfqKernel:
    name: str
    layer: str  # key into the per-shape layers
    layout: str
    op: str  # "i8" | "bgemm" | "f32"
    mnb_bits: int  # MatMulNBits bits of the same-bits baseline
    title: str


SPFQ_KERNELS = [
    SpfqKernel("spfq_1bit_i8", "binary", "sign", "i8", 2, "1-bit W x int8 A (sign)"),
    SpfqKernel("spfq_xnor", "binary", "sign", "bgemm", 2, "XNOR/popcount 1-bit W x 1-bit A (sign)"),
    SpfqKernel("spfq_ternary_i8", "ternary", "sign_mask", "i8", 2, "ternary W x int8 A (sign_mask)"),
    SpfqKernel("spfq_2bit_i8", "int2", "planes", "i8", 2, "2-bit W x int8 A (planes)"),
    SpfqKernel("spfq_4bit_i8", "int4", "planes", "i8", 4, "4-bit W x int8 A (planes)"),
    SpfqKernel("spfq_4bit_sparse50_i8", "int4_sparse", "sparse", "i8", 4,
               "4-bit 50%-sparse W x int8 A (sparse)"),
    SpfqKernel("spfq_4bit_f32", "int4", "planes", "f32", 4, "4-bit W x fp32 A (planes)"),
]
QUANTIZER_OF = {"i8": "quantize_i8", "bgemm": "binarize", "f32": None}
# weak symbol of the range function behind each kernel (to say whether SIMD or the C oracle ran)
_RANGE_FN = {("sign", "i8"): "sign_i8", ("sign", "bgemm"): "bgemm", ("sign_mask", "i8"): "sign_mask_i8",
             ("planes", "i8"): "planes_i8", ("sparse", "i8"): "sparse_i8", ("planes", "f32"): "planes_f32"}

GOAL_4096 = (4096, 4096)
# One entry per PERF.md goal row (the "2-bit/ternary" row is judged for both kernels).
GOALS = [
    {"id": "1bit_i8_vs_ort_fp32", "perf_md": "1-bit weights x int8 act, GEMV 4096x4096",
     "goal": ">= 20x faster than ORT fp32", "kernel": "spfq_1bit_i8", "m": 1, "vs": "ort_fp32",
     "target": 20.0, "unit": "x"},
    {"id": "1bit_i8_vs_mnb2", "perf_md": "1-bit weights x int8 act, GEMV 4096x4096",
     "goal": ">= 4x faster than MatMulNBits 2-bit", "kernel": "spfq_1bit_i8", "m": 1, "vs": "mnb",
     "target": 4.0, "unit": "x"},
    {"id": "xnor_m64_vs_ort_fp32", "perf_md": "XNOR/popcount (binary x binary), M=64, 4096^2",
     "goal": ">= 6x faster than ORT fp32 at the same shape", "kernel": "spfq_xnor", "m": 64,
     "vs": "ort_fp32", "target": 6.0, "unit": "x"},
    {"id": "4bit_i8_vs_mnb4", "perf_md": "4-bit dense x int8 act, GEMV 4096x4096",
     "goal": ">= 1.5x faster than MatMulNBits 4-bit acc=4", "kernel": "spfq_4bit_i8", "m": 1,
     "vs": "mnb", "target": 1.5, "unit": "x"},
    {"id": "4bit_sparse50_vs_mnb4", "perf_md": "4-bit, 50% unstructured sparse, GEMV 4096^2",
     "goal": ">= 2x faster than MatMulNBits 4-bit acc=4", "kernel": "spfq_4bit_sparse50_i8",
     "m": 1, "vs": "mnb", "target": 2.0, "unit": "x"},
    {"id": "2bit_i8_vs_mnb2", "perf_md": "2-bit/ternary x int8 act, GEMV 4096x4096",
     "goal": ">= 2x faster than MatMulNBits 2-bit acc=4", "kernel": "spfq_2bit_i8", "m": 1,
     "vs": "mnb", "target": 2.0, "unit": "x"},
    {"id": "ternary_i8_vs_mnb2", "perf_md": "2-bit/ternary x int8 act, GEMV 4096x4096",
     "goal": ">= 2x faster than MatMulNBits 2-bit acc=4", "kernel": "spfq_ternary_i8", "m": 1,
     "vs": "mnb", "target": 2.0, "unit": "x"},
    {"id": "threads_2v1", "perf_md": "2 threads vs 1", "goal": ">= 1.7x for M >= 16",
     "target": 1.7, "unit": "x"},
    {"id": "e2e_minilm", "perf_md": "end to end, MiniLM encoder (batch 1, 128 tok), ORT + custom ops, "
     "1-bit/ternary linear layers", "goal": "<= 0.5x the latency of the fp32 ONNX model in ORT",
     "target": 0.5, "unit": "x"},
    {"id": "compress_minilm_time", "perf_md": "SPFQ compression of MiniLM (36 linear layers, "
     "256 calibration sentences)", "goal": "<= 60 s on this machine", "target": 60.0, "unit": " s"},
    {"id": "packed_size_1bit", "perf_md": "packed size, 1-bit linear layers",
     "goal": "<= 1.05 bits/weight including scales and padding", "target": 1.05, "unit": " bits/w"},
]

MNB_TOL = {0: 1e-4, 4: 3e-2}

NOTES = [
    "Ratios are medians of entries of this run, timed interleaved (round-robin) in one process.",
    "Goal ratios are e2e: kernel median + activation quantiser median (quantize_i8 / binarize, same M and K) "
    "against onnxruntime, which also takes float input; ratio_kernel_only is the kernel alone.",
    "The MatMulNBits baseline of a kernel is the faster of block_size 32 / 64 at accuracy_level 4, same bits "
    "(1-bit and ternary weights map onto bits=2).",
    "session.qdq_matmulnbits_accuracy_level is not set: it only steers the DequantizeLinear+MatMul -> "
    "MatMulNBits fusion; here the nodes are MatMulNBits already (mnb_verification.qdq_option shows it).",
    "onnxruntime picks its MLAS kernels from cpuid: on a CPU with AVX-512 / VNNI (machine.cpu_flags) its "
    "MatMulNBits and fp32 baselines are faster than the PERF.md anchors measured on AVX2-only Zen 3.",
    "GB/s counts packed weight bytes (+ scales); roofline = fastest plain streaming read of the same byte "
    "count at the same thread count measured in this run (hot, or cold with --cold).",
]  # max abs err / max |ref| for accuracy_level 0 / 4


# ------------------------------------------------------------------------------ machine

def machine_info(threads: int) -> dict:
    cpu, flags = None, set()
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name") and cpu is None:
                    cpu = line.split(":", 1)[1].strip()
                elif line.startswith("flags") and not flags:
                    flags = set(line.split(":", 1)[1].split())
    except OSError:
        pass
    l3 = None
    try:
        for idx in sorted(Path("/sys/devices/system/cpu/cpu0/cache").glob("index*")):
            if (idx / "level").read_text().strip() == "3":
                l3 = (idx / "size").read_text().strip()
    except OSError:
        pass
    import onnxruntime as ort
    try:
        import onnx
        onnx_v = onnx.__version__
    except ImportError:
        onnx_v = None
    try:
        import torch
        torch_v = torch.__version__
    except ImportError:
        torch_v = None
    try:
        impl = {isa: sorted(f for f in set(_RANGE_FN.values()) if _has_symbol(f"spfq_{f}_{isa}"))
                for isa in ("c", "avx2", "neon")}
        kisa, abi = K.isa(), int(K.lib().spfq_abi_version())
    except Exception as e:  # library not built: the run still measures onnxruntime
        impl, kisa, abi = {"error": str(e)}, None, None
    return {
        "cpu": cpu or platform.processor() or platform.machine(),
        "cpu_flags": sorted(flags & {"avx2", "fma", "popcnt", "avx512f", "avx512bw", "avx512_vnni", "avx_vnni",
                                     "avx512_vpopcntdq"}),
        "logical_cpus": os.cpu_count(),
        "usable_cpus": len(os.sched_getaffinity(0)) if hasattr(os, "sched_getaffinity") else None,
        "l3": l3, "platform": platform.platform(), "python": platform.python_version(),
        "numpy": np.__version__, "onnxruntime": ort.__version__, "onnx": onnx_v, "torch": torch_v,
        "kernel_isa": kisa, "kernel_abi": abi, "kernel_range_functions": impl, "threads": threads,
        "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None,
    }


def _has_symbol(name: str) -> bool:
    try:
        getattr(K.lib(), name)
        return True
    except AttributeError:
        return False


def _impl_of(layout: str, op: str) -> str:
    """Which range function the dispatcher will run: the active ISA's, or the C fallback."""
    fn = _RANGE_FN.get((layout, op))
    if fn is None:
        return "unknown"
    chain = {"avx512": ("avx512", "avx2"), "avx2": ("avx2",), "neon": ("neon",)}.get(K.isa(), ())
    for isa in chain:  # api.c: avx512 falls back to avx2, every SIMD ISA to C
        if _has_symbol(f"spfq_{fn}_{isa}"):
            return isa
    return "c" if _has_symbol(f"spfq_{fn}_c") else "none"


# ------------------------------------------------------------------------------ weights

def _scale(rng, n):
    return (rng.random(n) * 0.1 + 0.01).astype(np.float16).astype(np.float32)


def make_layers(n: int, k: int, seed: int = 0) -> dict[str, CompressedLayer]:
    """The weights of one shape: binary, ternary, 2-bit, 4-bit and 4-bit 50%-pruned codes."""
    rng = np.random.default_rng(seed + 7919 * n + k)
    shape = (n, k)
    r = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)  # two draws feed every layer
    binary = (1 - 2 * (r & 1)).astype(np.int8)
    ternary = ((r >> 1) % 3).astype(np.int8) - np.int8(1)  # {-1, 0, 1}, 1/3 zeros
    int4 = ((r >> 3) % 15).astype(np.int8) - np.int8(7)  # [-7, 7]
    r = rng.integers(0, 1 << 16, size=shape, dtype=np.uint16)
    sparse = ((r % 7).astype(np.int8) + np.int8(1)) * (1 - 2 * ((r >> 3) & 1)).astype(np.int8)  # +-[1, 7]
    sparse[((r >> 4) & 1).astype(bool)] = 0  # 50% zeros, unstructured
    del r
    s = _scale(rng, n)
    lam = (s * 1.7).astype(np.float16).astype(np.float32)
    mk = lambda name, alpha, bits, codes, lam=None: CompressedLayer(  # noqa: E731
        name, "linear", shape, alpha, bits, codes, s.copy(), lam, None,
        meta={"sparsity_target": 0.5 if lam is not None else 0.0})
    return {"binary": mk("binary", "binary", 1, binary), "ternary": mk("ternary", "ternary", 2, ternary),
            "int2": mk("int2", "int", 2, ternary), "int4": mk("int4", "int", 4, int4),
            "int4_sparse": mk("int4_sparse", "int", 4, sparse, lam)}


def _sub(layer: CompressedLayer, i: int, j: int) -> CompressedLayer:
    return CompressedLayer(layer.name, "linear", (j - i, layer.cols), layer.alphabet, layer.bits,
                           layer.codes[i:j], layer.scale[i:j],
                           None if layer.lam is None else layer.lam[i:j], None)


def dequant_matvec(layer: CompressedLayer, v: np.ndarray, chunk: int = 2048) -> np.ndarray:
    """float64 (r, N) = v (r, K) @ dequantize(layer).T, a few rows of weights at a time."""
    v = np.atleast_2d(np.asarray(v, np.float64))
    out = np.empty((v.shape[0], layer.rows))
    for i in range(0, layer.rows, chunk):
        j = min(layer.rows, i + chunk)
        out[:, i:j] = v @ _sub(layer, i, j).dequantize().astype(np.float64).T
    return out


def abs_matvec(layer: CompressedLayer, v: np.ndarray, chunk: int = 2048) -> np.ndarray:
    v = np.abs(np.atleast_2d(np.asarray(v, np.float64)))
    out = np.empty((v.shape[0], layer.rows))
    for i in range(0, layer.rows, chunk):
        j = min(layer.rows, i + chunk)
        out[:, i:j] = v @ np.abs(_sub(layer, i, j).dequantize().astype(np.float64)).T
    return out


def pack_mnb(q: np.ndarray, bits: int, block: int) -> np.ndarray:
    """MatMulNBits B: uint8 (N, n_blocks, block*bits/8). Row n of B is output column n; field i of
    a block sits in bits [(i % per)*bits, ...) of byte i // per (per = 8 / bits), LSB first;
    the last block is zero padded. q holds unsigned codes in [0, 2^bits)."""
    n, k = q.shape
    nb = -(-k // block)
    per = 8 // bits
    qp = np.zeros((n, nb * block), np.uint8)
    qp[:, :k] = q
    qp = qp.reshape(n, nb * block // per, per)
    out = np.zeros(qp.shape[:2], np.uint8)
    for i in range(per):
        out |= qp[:, :, i] << np.uint8(i * bits)
    return out.reshape(n, nb, block * bits // 8)


def mnb_weights(layer: CompressedLayer, bits: int, block: int) -> tuple[np.ndarray, np.ndarray]:
    """MatMulNBits B and scales computing exactly dequantize(layer) for lam-free int/ternary codes
    (default zero point 2^(bits-1), one scale per row repeated over its blocks)."""
    assert layer.lam is None and int(np.abs(layer.codes).max()) <= 2 ** (bits - 1) - 1
    q = (layer.codes.astype(np.int16) + 2 ** (bits - 1)).astype(np.uint8)
    nb = -(-layer.cols // block)
    return pack_mnb(q, bits, block), np.repeat(layer.scale.astype(np.float32), nb)


# ------------------------------------------------------------------------------ onnxruntime

def _ort():
    import onnxruntime as ort
    ort.set_default_logger_severity(3)
    return ort


def _model_bytes(node, k: int, n: int, inits: list) -> bytes:
    from onnx import TensorProto, helper
    g = helper.make_graph([node], "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["M", k])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["M", n])],
                          initializer=inits)
    m = helper.make_model(g, opset_imports=[helper.make_opsetid("", 17), helper.make_opsetid("com.microsoft", 1)],
                          ir_version=10, producer_name="spfq-bench")
    return m.SerializeToString()


def fp32_model(w: np.ndarray) -> bytes:
    """One MatMul node, y = x @ w.T with w (N, K) stored as the (K, N) initializer."""
    from onnx import helper, numpy_helper
    n, k = w.shape
    node = helper.make_node("MatMul", ["x", "W"], ["y"])
    return _model_bytes(node, k, n, [numpy_helper.from_array(np.ascontiguousarray(w.T), "W")])


def mnb_model(b: np.ndarray, scales: np.ndarray, k: int, n: int, bits: int, block: int, acc: int) -> bytes:
    from onnx import helper, numpy_helper
    node = helper.make_node("MatMulNBits", ["x", "B", "scales"], ["y"], domain="com.microsoft",
                            K=k, N=n, bits=bits, block_size=block, accuracy_level=acc)
    return _model_bytes(node, k, n, [numpy_helper.from_array(b, "B"), numpy_helper.from_array(scales, "scales")])


def session(model: bytes, threads: int, config: dict | None = None):
    ort = _ort()
    so = ort.SessionOptions()
    for key, val in (config or {}).items():
        so.add_session_config_entry(key, val)
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.execution_mode = ort.ExecutionMode.ORT_SEQUENTIAL
    so.log_severity_level = 3
    return ort.InferenceSession(model, so, providers=["CPUExecutionProvider"])


def bound_call(sess, x: np.ndarray, n: int) -> Callable[[], np.ndarray]:
    """run_with_iobinding on preallocated input/output (the lowest-overhead way to call ORT)."""
    y = np.empty((x.shape[0], n), np.float32)
    b = sess.io_binding()
    b.bind_cpu_input("x", x)
    b.bind_output("y", "cpu", 0, np.float32, list(y.shape), y.ctypes.data)

    def call():
        sess.run_with_iobinding(b)
        return y
    call._keep = (b, x, y)  # keep the bound buffers alive
    return call


def verify_mnb(seed: int = 1, n: int = 96, k: int = 320, m: int = 3) -> dict:
    """Once per run: MatMulNBits (every bits / block / accuracy level benchmarked) against
    x @ dequantize(layer).T in float64. Proves the B / scales packing above is right."""
    rng = np.random.default_rng(seed)
    x = rng.standard_normal((m, k)).astype(np.float32)
    cases = []
    for bits in MNB_BITS:
        kmax = 2 ** (bits - 1) - 1
        codes = rng.integers(-kmax, kmax + 1, size=(n, k), dtype=np.int8)
        layer = CompressedLayer("v", "linear", (n, k), "int", bits, codes, _scale(rng, n))
        ref = x.astype(np.float64) @ layer.dequantize().astype(np.float64).T
        for block in MNB_BLOCKS:
            b, sc = mnb_weights(layer, bits, block)
            for acc in MNB_ACC:
                case = {"bits": bits, "block_size": block, "accuracy_level": acc, "m": m, "n": n, "k": k}
                try:
                    y = session(mnb_model(b, sc, k, n, bits, block, acc), 1).run(None, {"x": x})[0]
                    err, top = float(np.abs(y - ref).max()), float(np.abs(ref).max())
                    case.update(max_abs_err=err, ref_max_abs=top, tol=MNB_TOL[acc] * top,
                                ok=bool(err <= MNB_TOL[acc] * top))
                except Exception as e:
                    case.update(ok=False, error=f"{type(e).__name__}: {e}")
                cases.append(case)
    return {"passed": all(c["ok"] for c in cases), "cases": cases,
            "qdq_option": _qdq_option_effect(x, rng, n, k),
            "reference": "float64 x @ dequantize(codes, scale).T; B packed LSB-first per byte, "
                         "default zero point 2^(bits-1)",
            "tolerance": "max abs err <= tol_rel * max|ref|, tol_rel = "
                         + ", ".join(f"{v:g} (acc={a})" for a, v in MNB_TOL.items())}


def _qdq_option_effect(x, rng, n, k) -> dict:
    """Does session.qdq_matmulnbits_accuracy_level change a MatMulNBits node's result? (It should
    only steer the DequantizeLinear+MatMul fusion.) Same acc=4 node with the option "0" and without:
    identical outputs mean the node's own accuracy_level decides, so the benchmark leaves it unset."""
    codes = rng.integers(-7, 8, size=(n, k), dtype=np.int8)
    layer = CompressedLayer("q", "linear", (n, k), "int", 4, codes, _scale(rng, n))
    b, sc = mnb_weights(layer, 4, 32)
    model = mnb_model(b, sc, k, n, 4, 32, 4)
    try:
        y_plain = session(model, 1).run(None, {"x": x})[0]
        y_opt = session(model, 1, {"session.qdq_matmulnbits_accuracy_level": "0"}).run(None, {"x": x})[0]
        y_acc0 = session(mnb_model(b, sc, k, n, 4, 32, 0), 1).run(None, {"x": x})[0]
    except Exception as e:
        return {"error": _fmt_err(e)}
    same = bool(np.array_equal(y_plain, y_opt))
    return {"node_accuracy_level": 4, "option_value": "0", "outputs_identical": same,
            "acc0_differs_from_acc4": bool(not np.array_equal(y_plain, y_acc0)),
            "conclusion": "option has no effect on MatMulNBits nodes; not set" if same
            else "option changes MatMulNBits results: pin it"}


# ------------------------------------------------------------------------------ roofline

class CacheFlusher:
    """Reads a buffer twice the size of the L3 so the next call finds its weights in DRAM."""

    def __init__(self, nbytes: int = 64 << 20):
        self.buf = np.ones(nbytes // 8, np.uint64)  # written, so not the shared zero page

    def __call__(self):
        np.bitwise_or.reduce(self.buf)


class Roofline:
    """Streaming-read bandwidth of `nbytes` at a thread count: numpy bitwise_or.reduce over
    uint64 (one thread) and torch.sum over float32 (torch threads = threads); the faster one is
    the anchor. Measured once per (nbytes, threads), hot like the kernels' repeated calls, or
    after a cache flush before every read when `flush` is given (--cold). The anchor is the best
    sample (the attainable peak: noise on a shared machine only ever slows a read down)."""

    def __init__(self, samples: int = 11, flush: "CacheFlusher | None" = None):
        self.samples, self.memo, self.flush = samples, {}, flush

    def gbps(self, nbytes: int, threads: int) -> dict:
        key = (int(nbytes), int(threads))
        if key not in self.memo:
            self.memo[key] = self._measure(*key)
        return self.memo[key]

    def _measure(self, nbytes: int, threads: int) -> dict:
        words = max(1, nbytes // 8)
        a = np.ones(2 * words, np.float32)
        u = a.view(np.uint64)
        res = {"bytes": 8 * words, "threads": threads, "cold": self.flush is not None}
        res["numpy_or_reduce_gbps"] = self._rate(lambda: np.bitwise_or.reduce(u), 8 * words)
        try:
            import torch
            old = torch.get_num_threads()
            torch.set_num_threads(threads)
            try:
                ta = torch.from_numpy(a)
                res["torch_sum_gbps"] = self._rate(lambda: ta.sum(), 8 * words)
            finally:
                torch.set_num_threads(old)
            if threads > 1:
                time.sleep(0.05)  # OpenMP workers spin a while after a parallel region
        except ImportError:
            pass
        res["gbps"] = max(v for k, v in res.items() if k.endswith("_gbps"))
        return res

    def _rate(self, fn, nbytes: int) -> float:
        fn()
        if self.flush is not None:
            ts = []
            for _ in range(self.samples):
                self.flush()
                t0 = time.perf_counter_ns()
                fn()
                ts.append(time.perf_counter_ns() - t0)
            return nbytes / float(min(ts))
        t0 = time.perf_counter_ns()
        fn()
        one = max(1, time.perf_counter_ns() - t0)
        reps = max(1, int(2e6 // one))  # >= ~2 ms per sample
        ts = []
        for _ in range(self.samples):
            t0 = time.perf_counter_ns()
            for _ in range(reps):
                fn()
            ts.append((time.perf_counter_ns() - t0) / reps)
        return nbytes / float(min(ts))  # bytes per ns == GB/s


# ------------------------------------------------------------------------------ timing

@dataclass
class Item:
    id: str
    fn: Callable[[], Any] | None
    meta: dict
    check: Callable[[Any], dict] | None = None
    samples: list = field(default_factory=list)
    reason: str | None = None
    want: int = 0
    est_ns: float = 0.0


def _fmt_err(e: BaseException) -> str:
    return f"{type(e).__name__}: {e}"


def time_items(items: list[Item], repeats: int, budget_s: float, min_repeats: int = 5,
               rounds: int = 5, slow_s: float = 0.5, spin_gap_s: float = 0.003, flush=None,
               skip_s: float = float("inf"), log=print) -> None:
    """Warm each item up (first call checked for correctness), then take its samples in `rounds`
    interleaved rounds (order reversed every other round). Each round starts an item with one
    discarded call (cache re-warm after the other items) unless a call takes > 50 ms. After a
    multi-threaded item (onnxruntime's or the kernels' pool) a short pause lets its spinning
    workers stop, so they do not steal the second core from the next item. With `flush` (--cold) the caches are flushed before
    every timed call instead of re-warmed. An item whose namesake at another thread count took
    longer than skip_s for its first call is skipped (recorded with the reason)."""
    live, first_ns = [], {}
    for it in items:
        if it.fn is None:
            continue
        name = it.meta.get("name", it.id)
        if first_ns.get(name, 0) > skip_s * 1e9:
            it.reason = (f"skipped: the {items_threads(items, name)}-thread call took "
                         f"{first_ns[name] / 1e9:.1f} s > {skip_s:g} s")
            continue
        try:
            t0 = time.perf_counter_ns()
            out = it.fn()
            t1 = time.perf_counter_ns() - t0
            first_ns.setdefault(name, t1)
            if it.check is not None:
                it.meta["check"] = it.check(out)
            if t1 > slow_s * 1e9:
                it.est_ns = t1
                it.want = max(1, min(min_repeats, int(budget_s * 1e9 // t1)))
            else:
                t0 = time.perf_counter_ns()
                it.fn()
                it.est_ns = max(1, time.perf_counter_ns() - t0)
                it.want = max(min(min_repeats, repeats), min(repeats, int(budget_s * 1e9 // it.est_ns)))
            live.append(it)
        except K.KernelError as e:
            it.reason = str(e)
        except Exception as e:  # an onnxruntime failure, a binding error...: recorded, run goes on
            it.reason = _fmt_err(e)
    rounds = max(1, min(rounds, max((it.want for it in live), default=1)))
    for r in range(rounds):
        order = live if r % 2 == 0 else live[::-1]
        for it in order:
            need = it.want - len(it.samples)
            if need <= 0:
                continue
            left = rounds - r
            k = min(need, -(-need // left))
            try:
                if it.est_ns < 50e6 and r > 0 and flush is None:
                    it.fn()
                for _ in range(k):
                    if flush is not None:
                        flush()
                    t0 = time.perf_counter_ns()
                    it.fn()
                    it.samples.append(time.perf_counter_ns() - t0)
                if it.meta.get("threads", 1) > 1:
                    time.sleep(spin_gap_s)  # let spinning pool workers (ORT's, ours) go idle first
            except Exception as e:
                it.reason = _fmt_err(e)
                it.samples.clear()
                it.want = 0


def items_threads(items: list[Item], name: str) -> int:
    return next((it.meta.get("threads", 1) for it in items if it.meta.get("name") == name), 1)


def _stats(samples: list) -> dict:
    a = np.asarray(samples, np.float64)
    return {"median_ns": float(np.median(a)), "p10_ns": float(np.percentile(a, 10)),
            "p90_ns": float(np.percentile(a, 90)), "min_ns": float(a.min()), "samples": len(samples),
            "samples_ns": [int(s) for s in samples]}


# ------------------------------------------------------------------------------ the run

def _eid(name: str, m: int, n: int | None, k: int, t: int) -> str:
    return f"{name}|M={m}|N={n}|K={k}|t={t}" if n is not None else f"{name}|M={m}|K={k}|t={t}"


def _check_close(y, ref: np.ndarray, tol: float) -> dict:
    err = float(np.abs(np.asarray(y[0], np.float64) - ref).max())
    return {"rows": 1, "max_abs_err": err, "tol": float(tol), "ok": bool(err <= tol)}


def _resolve_shapes(shapes) -> tuple[str, list[tuple[int, int, int]]]:
    if shapes == "quick":
        return "quick", list(QUICK_SHAPES)
    if shapes == "full":
        return "full", full_shapes()
    return "custom", [tuple(int(v) for v in s) for s in shapes]


def run(shapes="quick", threads: int = 1, scaling: bool = False, repeats: int | None = None,
        budget_s: float | None = None, isa: str = "auto", min_repeats: int = 5,
        skip_call_s: float | None = None, cold: bool = False, log=print) -> dict:
    """Measure everything; return the JSON document (also what main() writes).

    shapes: "quick", "full" or a list of (M, N, K). scaling: also 2-thread entries for M >= 16
    (needs threads == 1). cold: flush the caches (read 64 MiB) before every timed call, so weights
    come from DRAM whatever their size (the roofline anchor is then a cold read too).
    To bound the run time, an entry whose predicted call time (linear in M from the next smaller M
    of the same weights, or its 1-thread namesake's first call) exceeds skip_call_s (quick 1 s,
    full 5 s) is recorded as missing with the reason "skipped"."""
    mode, shape_list = _resolve_shapes(shapes)
    cfg = MODES["full" if mode == "full" else "quick"]
    repeats = repeats or cfg["repeats"]
    budget_s = cfg["budget_s"] if budget_s is None else budget_s
    skip_call_s = cfg["skip_call_s"] if skip_call_s is None else skip_call_s
    min_repeats = min(min_repeats, repeats)
    threads_list = [threads] + ([2] if scaling and threads == 1 else [])
    if scaling and threads != 1:
        log("--scaling compares 2 threads with 1: ignored with --threads != 1")
    started = time.perf_counter()
    torch_old = None
    try:
        import torch
        torch_old = torch.get_num_threads()
        torch.set_num_threads(threads)
    except ImportError:
        torch = None
    kernels_ok = True
    try:
        K.set_isa(isa)
    except Exception as e:
        kernels_ok = False
        log(f"kernel library unavailable ({e}): project kernels are recorded as missing")
    try:
        doc = {"schema": SCHEMA, "created": _dt.datetime.now(_dt.timezone.utc).isoformat(timespec="seconds"),
               "run_id": f"{os.getpid()}-{time.time_ns()}",
               "config": {"shapes": mode, "shape_list": [list(s) for s in shape_list], "threads": threads,
                          "scaling": bool(scaling and threads == 1), "repeats": repeats, "budget_s": budget_s,
                          "min_repeats": min_repeats, "isa": isa, "skip_call_s": skip_call_s,
                          "cold": bool(cold)},
               "notes": NOTES,
               "machine": machine_info(threads)}
        log("verifying MatMulNBits packing against numpy ...")
        doc["mnb_verification"] = verify_mnb()
        log("  " + ("passed" if doc["mnb_verification"]["passed"] else "FAILED") + ": " + ", ".join(
            f"b{c['bits']}/bs{c['block_size']}/acc{c['accuracy_level']} err {c.get('max_abs_err', float('nan')):.2g}"
            for c in doc["mnb_verification"]["cases"]))
        flush = CacheFlusher() if cold else None
        roof = Roofline(flush=flush)
        entries: dict[str, dict] = {}
        storage = []
        groups: dict[tuple[int, int], list[int]] = {}
        for m, n, k in shape_list:
            groups.setdefault((n, k), []).append(m)
        for (n, k), ms in groups.items():
            ms = sorted(set(ms))
            _run_group(n, k, ms, threads_list, kernels_ok, roof, entries, storage, repeats, budget_s,
                       min_repeats, skip_call_s, flush, log)
            gc.collect()
        doc["entries"] = list(entries.values())
        _add_ratios(entries)
        doc["scaling"] = _scaling(entries, threads_list)
        doc["storage"] = storage
        doc["goals"] = evaluate_goals(entries, doc["scaling"], storage, threads)
        doc["machine"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
        doc["wall_s"] = time.perf_counter() - started
        return doc
    finally:
        if torch is not None and torch_old is not None:
            torch.set_num_threads(torch_old)
        if kernels_ok:
            K.set_isa("auto")


def _run_group(n, k, ms, threads_list, kernels_ok, roof, entries, storage, repeats, budget_s, min_repeats,
               skip_call_s, flush, log):
    t_build = time.perf_counter()
    layers = make_layers(n, k)
    storage.append({"layer": f"binary {n}x{k}", **L.storage_report(layers["binary"], "sign")})
    rng = np.random.default_rng(n * 31 + k)
    X = rng.standard_normal((max(ms), k)).astype(np.float32)
    x0 = X[:1]
    # activation quantisation of row 0 (per row, so the same for every M)
    try:
        xq0, xs0 = K.quantize_i8(np.ascontiguousarray(x0))
        _, xbs0 = K.binarize(np.ascontiguousarray(x0))
        sx0 = np.where(x0 < 0, -1.0, 1.0)
    except Exception:
        xq0 = None
    if xq0 is None:
        kernels_ok = False
    # references of output row 0
    ref_f = {key: dequant_matvec(layers[key], x0)[0] for key in ("int2", "int4")}
    ref_f_abs = {key: abs_matvec(layers[key], x0)[0] for key in ("int4",)}
    ref_i8 = {}
    if xq0 is not None:
        for key in ("binary", "ternary", "int2", "int4", "int4_sparse"):
            ref_i8[key] = float(xs0[0]) * dequant_matvec(layers[key], xq0.astype(np.float64))[0]
        ref_dot = (layers["binary"].codes.astype(np.float32) @ sx0[0].astype(np.float32))[None, :]  # exact: |dot| <= K
    # weights: onnxruntime
    wbytes = {}
    w_fp32 = np.concatenate([_sub(layers["int4"], i, min(n, i + 2048)).dequantize()
                             for i in range(0, n, 2048)])
    models = {("ort_fp32",): fp32_model(w_fp32)}
    wbytes[("ort_fp32",)] = w_fp32.nbytes
    del w_fp32
    for bits in MNB_BITS:
        src = layers["int2" if bits == 2 else "int4"]
        for block in MNB_BLOCKS:
            b, sc = mnb_weights(src, bits, block)
            for acc in MNB_ACC:
                models[("mnb", bits, block, acc)] = mnb_model(b, sc, k, n, bits, block, acc)
                wbytes[("mnb", bits, block, acc)] = b.nbytes + sc.nbytes
    sessions, sess_err = {}, {}
    for t in threads_list:
        for key, model in models.items():
            if t != threads_list[0] and key[0] == "mnb" and key[3] != 4:
                continue  # 2-thread entries: only the acc=4 baselines
            try:
                sessions[(key, t)] = session(model, t)
            except Exception as e:
                sess_err[(key, t)] = _fmt_err(e)
    del models
    # weights: project kernels
    packed, pack_err = {}, {}
    for spec in SPFQ_KERNELS:
        pk = (spec.layer, spec.layout)
        if pk in packed or pk in pack_err:
            continue
        if not kernels_ok:
            pack_err[pk] = "kernel library not available"
            continue
        try:
            layer = layers[spec.layer]
            bufs = L.pack_layer(layer, spec.layout)
            nb = sum(a.nbytes for a in bufs.values()) + layer.scale.nbytes
            nb += 0 if layer.lam is None else layer.lam.nbytes
            packed[pk] = (K.PackedWeights.from_layer(layer, spec.layout), nb)
            del bufs
        except Exception as e:
            pack_err[pk] = _fmt_err(e)
    log(f"N={n} K={k}: built weights and sessions in {time.perf_counter() - t_build:.1f} s")

    prev_ns: dict[str, tuple[int, float]] = {}  # name -> (M, median ns at the base thread count)
    for m in ms:
        x = np.ascontiguousarray(X[:m])
        xq = xs = xb = xbs = None
        if kernels_ok:
            xq, xs = K.quantize_i8(x)
            xb, xbs = K.binarize(x)
        items: list[Item] = []

        def add(name, t, fn, meta, check=None, missing=None, n_=n, m=m, items=items):
            eid = _eid(name, m, n_, k, t)
            meta = {"id": eid, "name": name, "m": m, "n": n_, "k": k, "threads": t, **meta}
            it = Item(eid, fn, meta, check)
            if missing is None and fn is not None and name in prev_ns:
                m0, ns0 = prev_ns[name]
                pred = ns0 * m / m0
                if pred > skip_call_s * 1e9:
                    it.fn, missing = None, (f"skipped: predicted {pred / 1e9:.1f} s per call "
                                            f"(from M={m0}) > {skip_call_s:g} s")
            if missing is not None:
                it.fn, it.reason = None, missing
            items.append(it)

        for t in threads_list:
            if t != threads_list[0] and m < 16:
                continue
            key = ("ort_fp32",)
            s = sessions.get((key, t))
            add("ort_fp32", t, bound_call(s, x, n) if s else None,
                {"kind": "ort", "title": "onnxruntime fp32 MatMul", "weight_bytes": wbytes[key]},
                check=lambda y: _check_close(y, ref_f["int4"], 1e-4 * ref_f_abs["int4"].max() + 1e-6),
                missing=None if s else sess_err.get((key, t), "no session"))
            for bits in MNB_BITS:
                for block in MNB_BLOCKS:
                    for acc in MNB_ACC:
                        key = ("mnb", bits, block, acc)
                        if (key, t) not in sessions and (key, t) not in sess_err:
                            continue
                        s = sessions.get((key, t))
                        ref = ref_f["int2" if bits == 2 else "int4"]
                        add(f"ort_mnb{bits}_bs{block}_acc{acc}", t, bound_call(s, x, n) if s else None,
                            {"kind": "ort", "title": f"onnxruntime MatMulNBits {bits}-bit bs{block} acc={acc}",
                             "bits": bits, "block_size": block, "accuracy_level": acc, "weight_bytes": wbytes[key]},
                            check=lambda y, ref=ref, acc=acc: _check_close(y, ref, MNB_TOL[acc] * np.abs(ref).max()),
                            missing=None if s else sess_err.get((key, t), "no session"))
            for spec in SPFQ_KERNELS:
                pk = (spec.layer, spec.layout)
                meta = {"kind": "spfq", "title": spec.title, "layout": spec.layout, "op": spec.op,
                        "mnb_bits": spec.mnb_bits, "quantizer": QUANTIZER_OF[spec.op]}
                if pk not in packed:
                    add(spec.name, t, None, meta, missing=pack_err.get(pk, "not packed"))
                    continue
                pw, nb = packed[pk]
                meta.update(weight_bytes=nb, impl=_impl_of(spec.layout, spec.op))
                if spec.op == "i8":
                    fn = (lambda pw=pw, t=t, xq=xq, xs=xs: pw.matmul_i8(xq, xs, t))
                    ref = ref_i8[spec.layer]
                    chk = (lambda y, ref=ref: _check_close(y, ref, 1e-4 * np.abs(ref).max() + 1e-6))
                elif spec.op == "bgemm":
                    fn = (lambda pw=pw, t=t, xb=xb, xbs=xbs: pw.bgemm(xb, xbs, t))
                    sc = layers["binary"].scale.astype(np.float64)

                    def chk(out, sc=sc):
                        dot, y = out
                        exact = bool(np.array_equal(dot[0].astype(np.float64), ref_dot[0]))
                        yref = float(xbs0[0]) * sc * ref_dot[0]
                        c = _check_close(y, yref, 1e-5 * np.abs(yref).max() + 1e-6)
                        c["dot_exact"] = exact
                        c["ok"] = c["ok"] and exact
                        return c
                else:
                    fn = (lambda pw=pw, t=t, x=x: pw.matmul_f32(x, t))
                    ref = ref_f[spec.layer]
                    tol = 1e-4 * ref_f_abs[spec.layer].max() + 1e-6
                    chk = (lambda y, ref=ref, tol=tol: _check_close(y, ref, tol))
                add(spec.name, t, fn, meta, check=chk)
        if kernels_ok and xq is not None:  # activation quantisers (single threaded by design)
            add("quantize_i8", 1, lambda x=x: K.quantize_i8(x),
                {"kind": "quantizer", "title": "quantize_i8 (fp32 -> int8)", "weight_bytes": 0}, n_=None)
            add("binarize", 1, lambda x=x: K.binarize(x),
                {"kind": "quantizer", "title": "binarize (fp32 -> sign bits)", "weight_bytes": 0}, n_=None)
        t0 = time.perf_counter()
        time_items(items, repeats, budget_s, min_repeats, flush=flush, skip_s=skip_call_s, log=log)
        for it in items:
            e = dict(it.meta)
            if it.samples:
                e.update(status="ok", **_stats(it.samples))
                if it.meta["threads"] == threads_list[0]:
                    prev_ns[it.meta["name"]] = (m, e["median_ns"])
                if e.get("n"):
                    e["gmac_per_s"] = e["m"] * e["n"] * e["k"] / e["median_ns"]
                if e.get("weight_bytes"):
                    e["gbps"] = e["weight_bytes"] / e["median_ns"]
                    r = roof.gbps(e["weight_bytes"], e["threads"])
                    e["roofline"] = r
                    e["roofline_fraction"] = e["gbps"] / r["gbps"]
            else:
                e.update(status="missing", reason=it.reason or "no samples")
            entries[e["id"]] = e
        ok = sum(1 for it in items if it.samples)
        log(f"  M={m:<4d} N={n} K={k}: {ok}/{len(items)} entries timed in {time.perf_counter() - t0:.1f} s")
    del sessions, packed, layers


# ------------------------------------------------------------------------------ ratios, goals

def _baseline_ids(e: dict, entries: dict) -> dict:
    m, n, k, t = e["m"], e["n"], e["k"], e["threads"]
    out = {}
    fp = entries.get(_eid("ort_fp32", m, n, k, t))
    if fp and fp["status"] == "ok":
        out["ort_fp32"] = fp["id"]
    bits = e.get("mnb_bits")
    if bits:
        cands = [entries.get(_eid(f"ort_mnb{bits}_bs{b}_acc4", m, n, k, t)) for b in MNB_BLOCKS]
        cands = [c for c in cands if c and c["status"] == "ok"]
        if cands:  # the faster block size is the (stronger) baseline
            out["mnb"] = min(cands, key=lambda c: c["median_ns"])["id"]
    return out


def _add_ratios(entries: dict) -> None:
    """ratio = baseline median / entry median, both from this run. e2e_* add the activation
    quantiser's median (same M, K) to the kernel's: float in, float out like onnxruntime.
    ratio_p10 is the same with 10th percentiles (less sensitive to a loaded machine)."""
    for e in entries.values():
        if e["status"] != "ok" or e["kind"] not in ("spfq", "ort") or e["name"] == "ort_fp32":
            continue
        base = _baseline_ids(e, entries)
        if e["kind"] == "ort":
            base.pop("mnb", None)
        ratios = {}
        q = None
        if e.get("quantizer"):
            qe = entries.get(_eid(e["quantizer"], e["m"], None, e["k"], 1))
            q = qe if qe and qe["status"] == "ok" else None
        for label, bid in base.items():
            b = entries[bid]
            ratios[f"vs_{label}"] = {"baseline": bid, "ratio": b["median_ns"] / e["median_ns"],
                                     "ratio_p10": b["p10_ns"] / e["p10_ns"]}
            if e["kind"] == "spfq":
                if e.get("quantizer") is None:
                    ratios[f"e2e_vs_{label}"] = {"baseline": bid, "quantizer": None,
                                                 "ratio": b["median_ns"] / e["median_ns"],
                                                 "ratio_p10": b["p10_ns"] / e["p10_ns"]}
                elif q is not None:
                    ratios[f"e2e_vs_{label}"] = {"baseline": bid, "quantizer": q["id"],
                                                 "ratio": b["median_ns"] / (e["median_ns"] + q["median_ns"]),
                                                 "ratio_p10": b["p10_ns"] / (e["p10_ns"] + q["p10_ns"])}
        e["ratios"] = ratios


def _scaling(entries: dict, threads_list: list[int]) -> list[dict]:
    if len(threads_list) < 2:
        return []
    out = []
    for e in entries.values():
        if e["threads"] != 1 or e["status"] != "ok" or e["m"] < 16 or e["kind"] == "quantizer":
            continue
        e2 = entries.get(_eid(e["name"], e["m"], e["n"], e["k"], 2))
        if e2 and e2["status"] == "ok":
            out.append({"name": e["name"], "kind": e["kind"], "m": e["m"], "n": e["n"], "k": e["k"],
                        "t1": e["id"], "t2": e2["id"], "speedup": e["median_ns"] / e2["median_ns"]})
    return out


def evaluate_goals(entries: dict, scaling: list, storage: list, threads: int) -> list[dict]:
    out = []
    for g in GOALS:
        r = {k: g[k] for k in ("id", "perf_md", "goal", "target", "unit")}
        if "kernel" in g:
            n, k = GOAL_4096
            eid = _eid(g["kernel"], g["m"], n, k, threads)
            r.update(entry=eid, threads=threads, basis="e2e: kernel + activation quantiser, float in / out")
            e = entries.get(eid)
            if e is None:
                r.update(status="not_measured", reason="shape not in this run (use --shapes quick or full)")
            elif e["status"] != "ok":
                r.update(status="missing", reason=e.get("reason"))
            else:
                rk, re_ = e.get("ratios", {}).get(f"vs_{g['vs']}"), e.get("ratios", {}).get(f"e2e_vs_{g['vs']}")
                if rk is None or re_ is None:
                    r.update(status="missing", reason=f"baseline {g['vs']} or quantiser not measured")
                else:
                    r.update(baseline=rk["baseline"], measured_ratio=re_["ratio"], ratio_kernel_only=rk["ratio"],
                             ratio_p10=re_["ratio_p10"],
                             kernel_only_met=rk["ratio"] >= g["target"],
                             roofline_fraction=e.get("roofline_fraction"), gbps=e.get("gbps"),
                             gmac_per_s=e.get("gmac_per_s"), impl=e.get("impl"))
                    chk = e.get("check", {})
                    if not chk.get("ok", False):
                        r.update(status="invalid", reason=f"output check failed: {chk}")
                    else:
                        r["status"] = "met" if re_["ratio"] >= g["target"] else "missed"
        elif g["id"] == "threads_2v1":
            sp = [s for s in scaling if s["kind"] == "spfq"]
            if not scaling:
                r.update(status="not_measured", reason="run with --scaling (threads 1 and 2 in one process)")
            elif not sp:
                r.update(status="missing", reason="no project kernel measured at both 1 and 2 threads with M >= 16")
            else:
                worst = min(sp, key=lambda s: s["speedup"])
                r.update(measured_ratio=worst["speedup"], worst=worst["t2"],
                         geomean=float(np.exp(np.mean(np.log([s["speedup"] for s in sp])))),
                         per_entry={s["t2"]: s["speedup"] for s in sp},
                         ort_fp32={s["t2"]: s["speedup"] for s in scaling if s["name"] == "ort_fp32"},
                         status="met" if worst["speedup"] >= g["target"] else "missed")
                e2 = entries[worst["t2"]]
                r["roofline_fraction"] = e2.get("roofline_fraction")
        elif g["id"] == "packed_size_1bit":
            if storage:
                bpw = max(s["bits_per_weight"] for s in storage)
                r.update(measured=bpw, layers=[s["layer"] for s in storage],
                         status="met" if bpw <= g["target"] else "missed",
                         basis="spfq_deploy.pack.layouts.storage_report, 'sign' layout, float16 scales")
            else:
                r.update(status="not_measured", reason="no shapes")
        elif g["id"] == "e2e_minilm":
            r.update(status="not_measured", reason="an end-to-end model benchmark, not a kernel one")
        elif g["id"] == "compress_minilm_time":
            r.update(status="elsewhere", reason="measured by benchmarks/compress_time.py")
        out.append(r)
    return out


# ------------------------------------------------------------------------------ report

def _ms(ns):
    return "-" if ns is None else (f"{ns / 1e6:.3f}" if ns < 1e8 else f"{ns / 1e6:.0f}")


def _x(v):
    return "-" if v is None else f"{v:.2f}x"


def markdown(doc: dict) -> str:
    ents = doc["entries"]
    mc = doc["machine"]
    lines = [f"Kernel benchmark ({doc['config']['shapes']}, {doc['config']['threads']} thread(s)"
             f"{', +2-thread scaling' if doc['config']['scaling'] else ''}"
             f"{', cold caches' if doc['config'].get('cold') else ''}) on {mc['cpu']}, "
             f"onnxruntime {mc['onnxruntime']}, kernel ISA {mc['kernel_isa']}; medians of interleaved runs; "
             f"MatMulNBits packing check {'passed' if doc['mnb_verification']['passed'] else 'FAILED'}.", "",
             "| kernel | M | N x K | t | median ms | p10-p90 ms | GMAC/s | GB/s | roofline | x ORT fp32 "
             "| x MNB acc4 | e2e x fp32 | e2e x MNB |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for e in ents:
        shape = f"{e['n']}x{e['k']}" if e.get("n") else f"K={e['k']}"
        label = e["name"] + (f" [{e['impl']}]" if e.get("impl") and e["impl"] not in ("unknown",) else "")
        if e["status"] != "ok":
            reason = (e.get("reason") or "")[:60].replace("|", "/")
            lines.append(f"| {label} | {e['m']} | {shape} | {e['threads']} | missing: {reason} "
                         "| | | | | | | | |")
            continue
        rat = e.get("ratios", {})
        g = lambda key, rat=rat: rat.get(key, {}).get("ratio")  # noqa: E731
        bad = "" if e.get("check", {}).get("ok", True) else " (CHECK FAILED)"
        lines.append(
            f"| {label}{bad} | {e['m']} | {shape} | {e['threads']} | {_ms(e['median_ns'])} "
            f"| {_ms(e['p10_ns'])}-{_ms(e['p90_ns'])} | {e['gmac_per_s']:.1f} | {e['gbps']:.1f} "
            f"| {100 * e['roofline_fraction']:.0f}% "
            f"| {_x(g('vs_ort_fp32'))} | {_x(g('vs_mnb'))} | {_x(g('e2e_vs_ort_fp32'))} | {_x(g('e2e_vs_mnb'))} |"
            if e.get("gbps") else
            f"| {label} | {e['m']} | {shape} | {e['threads']} | {_ms(e['median_ns'])} "
            f"| {_ms(e['p10_ns'])}-{_ms(e['p90_ns'])} | | | | | | | |")
    if doc.get("scaling"):
        lines += ["", "| 2 threads vs 1 | M | N x K | speedup |", "|---|---|---|---|"]
        for s in doc["scaling"]:
            lines.append(f"| {s['name']} | {s['m']} | {s['n']}x{s['k']} | {s['speedup']:.2f}x |")
    lines += ["", "Goals (PERF.md; ratio = e2e: kernel + activation quantiser vs onnxruntime, same run)", "",
              "| goal | target | measured | kernel only | p10 ratio | status | roofline (if missed) |",
              "|---|---|---|---|---|---|---|"]
    for g in doc["goals"]:
        meas = g.get("measured_ratio", g.get("measured"))
        unit = g.get("unit", "")
        status = g["status"] + (f" ({g['reason'][:70]})" if g.get("reason") else "")
        ko, roofs = g.get("ratio_kernel_only"), g.get("roofline_fraction")
        meas_s = "-" if meas is None else f"{meas:.3g}{unit}"
        ko_s = "-" if ko is None else f"{ko:.3g}{unit}"
        roof_s = f"{100 * roofs:.0f}%" if g["status"] == "missed" and roofs is not None else ""
        p10 = g.get("ratio_p10")
        p10_s = "-" if p10 is None else f"{p10:.3g}{unit}"
        lines.append(f"| {g['perf_md']}: {g['goal']} | {g['target']:g}{unit} | {meas_s} | {ko_s} | {p10_s} "
                     f"| {status} | {roof_s} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--shapes", choices=("quick", "full"), default="quick")
    ap.add_argument("--scaling", action="store_true", help="also 2-thread entries for M >= 16 (same process)")
    ap.add_argument("--repeats", type=int, default=None, help="max samples per entry (quick 20, full 30)")
    ap.add_argument("--budget", type=float, default=None, help="seconds of timing per entry (quick 0.35, full 1.0)")
    ap.add_argument("--isa", default="auto", help="kernel ISA: auto, c, avx2, neon")
    ap.add_argument("--cold", action="store_true", help="flush the caches before every timed call (weights from DRAM)")
    ap.add_argument("--out", default="benchmarks/results/kernels.json")
    args = ap.parse_args(argv)
    doc = run(args.shapes, threads=args.threads, scaling=args.scaling, repeats=args.repeats,
              budget_s=args.budget, isa=args.isa, cold=args.cold)
    out = Path(args.out)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, json.dumps(doc, indent=1))
    print()
    print(markdown(doc))
    print(f"\nwrote {out} ({doc['wall_s']:.0f} s)")


if __name__ == "__main__":
    main()
