"""CUDA GEMM benchmark (GitHub issue 7): the packed kernels of kernels/cuda against torch's fp16
and fp32 matmul, timed in the same process on the same GPU.

    PYTHONPATH=. python3 benchmarks/cuda_gemm.py [--shapes quick|full] [--batch 1,8,64] [--graph]
                                                 [--repeat 30] [--calls 100] [-o FILE.json]
    python benchmarks/cuda_gemm.py --emulation -o /tmp/e.json   (no GPU: plumbing check only)

Why: the CPU benchmark (benchmarks/kernels.py) cannot say whether the CUDA kernels are worth
having; only a side-by-side run against what a PyTorch user would otherwise call can.

What: weights N x K = 4096 x 4096 (`--shapes full` adds 4096 x 11008 and 11008 x 4096), batch
rows M in --batch. Kinds: 1-bit SIGN x int8, XNOR/popcount (binary weights x binary activations),
ternary (sign_mask), 2-bit and 4-bit planes, 4-bit 50%-sparse weights in the `sparse` layout and,
for comparison, the same weights dense in `planes`. Baselines: torch.nn.functional.linear in fp16
and in fp32 (TF32 off), with bias, as ours. Each of our kinds is timed twice: kernel only (int8
activations and their scales already on the device) and end to end (float32 activations in:
spfq_cuda_quantize_i8, then the GEMM). XNOR is kernel only: there is no GPU binariser.

How (timing): per entry, `--warmup` untimed loops, then `--repeat` samples, each a loop of R calls
between two CUDA events (torch.cuda.Event(enable_timing=True)) on torch's current stream; a call
costs elapsed / R; median, p10, p90 over the samples. Samples of the entries of one (shape, M) are
interleaved round by round. So that weights are read from HBM and not from L2, every entry
rotates over copies of its weights (ours: packed words + scales; torch: W) whose total is at
least 4x the L2 size (torch's L2_cache_size, 50 MB if unknown); R is a multiple of the number of
copies. Our kernels get torch's stream (ctypes calls with torch's data_ptr()s: our library and
torch share the device's primary context). Eager loops include the host's launch cost (ctypes for
ours, the dispatcher for torch), which dominates small GEMVs; `--graph` also captures each loop
in a torch.cuda.CUDAGraph (after warm-up launches) and times replays, which shows the GPU time
(a capture failure is recorded, not fatal). GB/s = weight bytes on the device / time.

Correctness: before timing, every copy of every kind's weights is run (kernel-only path) and y is
compared with a float64 numpy reference built from the layer's codes, scale, lam and bias and the
int8 activations (int layouts: y = xscale*(scale*acc_c + (lam-scale)*acc_s) + bias; SIGN /
SIGN_MASK: y = xscale*scale*acc_s + bias; XNOR: xscale*scale*dot + bias); the end-to-end path too
(the numpy quantiser here mirrors spfq_quantize_i8). max |y - ref| / max |ref| above 1e-5 stops
the run with exit status 1 (the JSON is still written, with "failed").

Without a CUDA GPU (or without CUDA in torch) the script prints one line and exits 2. --emulation
runs the same plan on tiny shapes against the host-emulation build of the library (numpy arrays
in the library's own "device" buffers, wall-clock time, no torch baselines): a check of this
script's plumbing and of the correctness check; its timings mean nothing.

Nothing here loads the CPU kernel library (spfq_deploy/_spfq_kernels*.so): packing is
spfq_deploy.pack (numpy), quantisation for the references is numpy.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime as _dt
import json
import os
import platform
import sys
import time
import warnings
from collections.abc import Callable
from dataclasses import dataclass, field
from pathlib import Path
from types import SimpleNamespace
from typing import Any

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))

import torch  # noqa: E402

from spfq_deploy.atomic import write_text  # noqa: E402
from spfq_deploy.compressed import CompressedLayer  # noqa: E402
from spfq_deploy.cuda_runtime import CudaError, CudaLibrary, CudaPackedWeights  # noqa: E402
from spfq_deploy.errors import SpfqError  # noqa: E402
from spfq_deploy.export.cuda import library as cuda_library  # noqa: E402
from spfq_deploy.kernels import kernel_pack  # noqa: E402
from spfq_deploy.pack.bits import pack_bits  # noqa: E402
from spfq_deploy.targets import get_target  # noqa: E402

SCHEMA = "spfq-cuda-gemm-bench/1"
TOL = 1e-5  # max |y - ref| / max |ref|
L2_FALLBACK = 50 * 2**20
TORCH_DEVICE = "cuda"
EMULATED_L2 = 16 * 2**10  # nominal, so that emulation still rotates over a few copies
SHAPES = {"quick": [(4096, 4096)], "full": [(4096, 4096), (4096, 11008), (11008, 4096)]}  # (N, K)
EMULATION_SHAPES = [(256, 256)]
DEFAULTS = {"gpu": {"batch": "1,8,64", "repeat": 30, "calls": 100, "warmup": 3},
            "emulation": {"batch": "1,3", "repeat": 3, "calls": 2, "warmup": 1}}
XNOR_NOTE = "kernel only: binarisation is not on the GPU (no spfq_cuda_binarize)"
METHOD = ("per entry: warm-up loops, then samples of R calls between two CUDA events on torch's current stream, "
          "per call = elapsed / R; median/p10/p90 over samples, entries of one (shape, M) interleaved; every entry "
          "rotates over weight copies totalling >= 4x L2 (R a multiple of the copies); --graph: the same loop "
          "captured in a CUDA graph, replays timed")


@dataclass(frozen=True)
class Kind:
    name: str
    weights: str  # key of make_layers()
    layout: str
    op: str  # "i8" | "bgemm"
    title: str


KINDS = [
    Kind("1bit_i8", "binary", "sign", "i8", "1-bit W x int8 A (sign)"),
    Kind("xnor", "binary", "sign", "bgemm", "XNOR/popcount 1-bit W x 1-bit A (sign)"),
    Kind("ternary_i8", "ternary", "sign_mask", "i8", "ternary W x int8 A (sign_mask)"),
    Kind("2bit_i8", "int2", "planes", "i8", "2-bit W x int8 A (planes)"),
    Kind("4bit_i8", "int4", "planes", "i8", "4-bit W x int8 A (planes)"),
    Kind("4bit_sparse50_i8", "int4_sparse", "sparse", "i8", "4-bit 50%-sparse W x int8 A (sparse)"),
    Kind("4bit_sparse50_planes_i8", "int4_sparse", "planes", "i8", "4-bit 50%-sparse W x int8 A (dense planes)"),
]


class CheckFailed(RuntimeError):
    """Our kernel's y differs from the float64 reference."""


class NoGpu(RuntimeError):
    """Nothing to measure on: no CUDA device for torch or for the kernel library."""


# ------------------------------------------------------------------------------ host data (numpy)

def make_layers(n: int, k: int, seed: int = 0) -> dict[str, CompressedLayer]:
    """Random codes of every kind for one shape; float16-representable scales, a bias."""
    rng = np.random.default_rng(seed + 7919 * n + k)
    scale = (rng.random(n) * 0.1 + 0.01).astype(np.float16).astype(np.float32)
    bias = rng.standard_normal(n).astype(np.float32)

    def codes(lo, hi):
        return rng.integers(lo, hi + 1, size=(n, k), dtype=np.int8)
    sparse = codes(1, 7) * (1 - 2 * codes(0, 1))
    sparse[rng.random((n, k)) < 0.5] = 0  # 50% zeros, unstructured
    lam = (scale * 1.7).astype(np.float16).astype(np.float32)

    def layer(name, alphabet, bits, c, lam=None):
        return CompressedLayer(name, "linear", (n, k), alphabet, bits, c, scale, lam, bias,
                               meta={"sparsity_target": 0.5 if lam is not None else 0.0})
    return {"binary": layer("binary", "binary", 1, 1 - 2 * codes(0, 1)),
            "ternary": layer("ternary", "ternary", 2, codes(-1, 1)),
            "int2": layer("int2", "int", 2, codes(-1, 1)),
            "int4": layer("int4", "int", 4, codes(-7, 7)),
            "int4_sparse": layer("int4_sparse", "int", 4, sparse, lam)}


def quantize_i8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """numpy mirror of spfq_quantize_i8: xscale = max|x| / 127 (float32), xq = round half away
    from zero of the float32 quotient, clamped to +-127, 0 where xscale == 0 (x is finite here)."""
    xs = (np.abs(x).max(axis=1) / np.float32(127)).astype(np.float32)
    with np.errstate(divide="ignore", invalid="ignore"):
        q = (x / xs[:, None]).astype(np.float64)
    q = np.clip(np.sign(q) * np.floor(np.abs(q) + 0.5), -127, 127)
    q[~np.isfinite(q) | (xs[:, None] == 0)] = 0
    return q.astype(np.int8), xs


def binarize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Activation sign bits packed like the weights (bit 1 = negative) and mean |x| per row."""
    return pack_bits(x < 0), (np.abs(x).astype(np.float64).sum(axis=1) / x.shape[1]).astype(np.float32)


def reference(layer: CompressedLayer, layout: str, xq: np.ndarray, xs: np.ndarray) -> np.ndarray:
    """float64 y of int8 activations, the ABI's formula for `layout`."""
    c = layer.codes.astype(np.float64)
    acc_s = xq.astype(np.float64) @ np.sign(c).T
    scale, bias = layer.scale.astype(np.float64), layer.bias.astype(np.float64)
    if layout in ("sign", "sign_mask"):
        v = scale * acc_s
    else:
        lam = scale if layer.lam is None else layer.lam.astype(np.float64)
        v = scale * (xq.astype(np.float64) @ c.T) + (lam - scale) * acc_s
    return xs.astype(np.float64)[:, None] * v + bias


def reference_xnor(layer: CompressedLayer, x: np.ndarray, xs: np.ndarray) -> np.ndarray:
    dot = np.where(x < 0, -1.0, 1.0) @ layer.codes.astype(np.float64).T
    return xs.astype(np.float64)[:, None] * layer.scale.astype(np.float64) * dot + layer.bias


def rel_err(y: np.ndarray, ref: np.ndarray) -> float:
    return float(np.abs(y.astype(np.float64) - ref).max() / max(np.abs(ref).max(), 1e-30))


# ------------------------------------------------------------------------------ devices

@dataclass
class Buf:
    """A device allocation: its address and whatever keeps it alive."""
    ptr: int | None
    keep: Any = None
    nbytes: int = 0


class GpuDevice:
    """Buffers are torch CUDA tensors (raw bytes); our kernels run on torch's current stream."""
    emulation = False

    def __init__(self):
        torch.backends.cuda.matmul.allow_tf32 = False
        self.props = torch.cuda.get_device_properties(0)
        self.l2_bytes = int(getattr(self.props, "L2_cache_size", 0) or L2_FALLBACK)

    def put(self, a: np.ndarray) -> Buf:
        a = np.ascontiguousarray(a)
        t = torch.from_numpy(a.reshape(-1).view(np.uint8)).to(TORCH_DEVICE)
        return Buf(t.data_ptr(), t, a.nbytes)

    def empty(self, shape, dtype) -> Buf:
        nbytes = int(np.prod(shape)) * np.dtype(dtype).itemsize
        t = torch.empty(max(nbytes, 1), dtype=torch.uint8, device=TORCH_DEVICE)
        return Buf(t.data_ptr(), t, nbytes)

    def sync(self) -> None:
        torch.cuda.synchronize()

    def get(self, buf: Buf, shape, dtype) -> np.ndarray:
        self.sync()
        return buf.keep[:buf.nbytes].cpu().numpy().view(dtype).reshape(shape)

    def stream(self) -> int:
        return torch.cuda.current_stream().cuda_stream

    def time_us(self, fn: Callable[[], None]) -> float:
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        end.synchronize()
        return start.elapsed_time(end) * 1e3

    def capture(self, loop: Callable[[], None]) -> Callable[[], None]:
        """A CUDA graph of one loop (warm-up launches on a side stream first, torch's recipe)."""
        side = torch.cuda.Stream()
        side.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(side):
            loop()
        torch.cuda.current_stream().wait_stream(side)
        graph = torch.cuda.CUDAGraph()
        with torch.cuda.graph(graph):
            loop()
        torch.cuda.synchronize()
        return graph.replay


class EmulatedDevice:
    """The host-emulation library's own buffers (host memory), synchronous calls, wall clock."""
    emulation = True
    l2_bytes = EMULATED_L2

    def __init__(self, lib: CudaLibrary):
        self.lib = lib

    def put(self, a: np.ndarray) -> Buf:
        b = self.lib.put(a)
        return Buf(b.ptr, b, b.nbytes)

    def empty(self, shape, dtype) -> Buf:
        b = self.lib.empty(shape, dtype)
        return Buf(b.ptr, b, b.nbytes)

    def get(self, buf: Buf, shape, dtype) -> np.ndarray:
        return self.lib.get(buf.keep, shape, dtype)

    def stream(self) -> None:
        return None

    def sync(self) -> None:
        self.lib.ok(self.lib.so.spfq_cuda_synchronize(None), "synchronize")

    def time_us(self, fn: Callable[[], None]) -> float:
        t0 = time.perf_counter()
        fn()
        self.sync()
        return (time.perf_counter() - t0) * 1e6

    def capture(self, loop):
        raise CudaError("CUDA graphs need a GPU (host emulation)")


# ------------------------------------------------------------------------------ our weights and calls

# One function per kernel; pointers are ints (None = NULL); the same code in GPU and emulation mode.
def call_i8(lib: CudaLibrary, w: CudaPackedWeights, m: int, xq, xs, y, stream) -> None:
    w.matmul_i8_device(m, xq, xs, y, stream)


def call_bgemm(lib: CudaLibrary, w: CudaPackedWeights, m: int, xbits, xs, y, stream) -> None:
    d = w.desc
    lib.ok(lib.so.spfq_cuda_bgemm(m, w.n, w.k, d.sign, xbits, xs, d.scale, d.bias, None, y, None, stream), "bgemm")


def call_quantize(lib: CudaLibrary, m: int, k: int, x, xq, xs, stream) -> None:
    lib.ok(lib.so.spfq_cuda_quantize_i8(m, k, x, xq, xs, stream), "quantize_i8")


def copies_for(nbytes: int, l2_bytes: int) -> int:
    """Enough copies of `nbytes` that together they are >= 4x the L2 (at least 2)."""
    return max(2, -(-4 * l2_bytes // max(nbytes, 1)))


# ------------------------------------------------------------------------------ timing

@dataclass
class Entry:
    """One timed thing: launch(i, stream) issues call i of a loop over `copies` weight copies."""
    name: str
    launch: Callable[[int, Any], None]
    copies: int
    calls: int  # R, a multiple of copies
    samples: list = field(default_factory=list)
    graph_samples: list = field(default_factory=list)
    replay: Callable[[], None] | None = None
    graph_error: str | None = None

    def loop(self, dev) -> None:
        s = dev.stream()
        for i in range(self.calls):
            self.launch(i, s)


def entry(name: str, launch, copies: int, calls: int) -> Entry:
    return Entry(name, launch, copies, copies * -(-calls // copies))


def stats(samples: list[float]) -> dict | None:
    if not samples:
        return None
    p10, p50, p90 = np.percentile(samples, [10, 50, 90])
    return {"median_us": float(p50), "p10_us": float(p10), "p90_us": float(p90),
            "samples_us": [round(s, 4) for s in samples]}


def measure(dev, entries: list[Entry], cfg: argparse.Namespace) -> None:
    """Warm up every entry, capture graphs if asked, then take samples round by round."""
    for e in entries:
        for _ in range(cfg.warmup):
            e.loop(dev)
    if cfg.graph:
        for e in entries:
            try:
                e.replay = dev.capture(lambda e=e: e.loop(dev))
            except Exception as exc:  # noqa: BLE001  (recorded; the eager timings still stand)
                e.graph_error = f"{type(exc).__name__}: {(str(exc).splitlines() or [''])[0]}"
                with contextlib.suppress(Exception):
                    dev.sync()
    for _ in range(cfg.repeat):
        for e in entries:
            e.samples.append(dev.time_us(lambda e=e: e.loop(dev)) / e.calls)
            if e.replay:
                e.graph_samples.append(dev.time_us(e.replay) / e.calls)


def timing(e: Entry | None, graph: bool) -> dict | None:
    if e is None:
        return None
    out = stats(e.samples)
    if graph:
        out["graph"] = stats(e.graph_samples) or {"error": e.graph_error}
    return out


# ------------------------------------------------------------------------------ one shape

class Activations:
    """Activations of the largest M on the host (numpy quantiser / binariser), and the device
    buffers of one M: int8 + scales, float rows (end to end), sign bits + scales (XNOR)."""

    def __init__(self, x_all: np.ndarray):
        self.x = x_all
        self.xq, self.xs = quantize_i8(x_all)
        self.xbits, self.xbs = binarize(x_all)

    def on_device(self, dev, m: int) -> SimpleNamespace:
        k = self.x.shape[1]
        d = SimpleNamespace(**{name: dev.put(getattr(self, name)[:m])
                               for name in ("x", "xq", "xs", "xbits", "xbs")})
        d.xq2, d.xs2 = dev.empty((m, k), np.int8), dev.empty((m,), np.float32)  # the e2e quantiser's output
        return d


def kernel_launch(lib, kind: Kind, ws: list[CudaPackedWeights], m: int, a: SimpleNamespace, y: Buf):
    """launch(i, stream) of the kernel-only path of a kind."""
    if kind.op == "bgemm":
        return lambda i, s: call_bgemm(lib, ws[i % len(ws)], m, a.xbits.ptr, a.xbs.ptr, y.ptr, s)
    return lambda i, s: call_i8(lib, ws[i % len(ws)], m, a.xq.ptr, a.xs.ptr, y.ptr, s)


def e2e_launch(lib, ws: list[CudaPackedWeights], m: int, k: int, a: SimpleNamespace, y: Buf):
    def launch(i, s):
        call_quantize(lib, m, k, a.x.ptr, a.xq2.ptr, a.xs2.ptr, s)
        call_i8(lib, ws[i % len(ws)], m, a.xq2.ptr, a.xs2.ptr, y.ptr, s)
    return launch


def run_once(dev, launch, y: Buf, m: int, n: int, copies: int) -> list[np.ndarray]:
    """y of call i for i in range(copies) (every weight copy once), untimed."""
    out = []
    for i in range(copies):
        launch(i, dev.stream())
        out.append(dev.get(y, (m, n), np.float32).copy())
    return out


def check(dev, name: str, launch, y: Buf, ref: np.ndarray, copies: int) -> float:
    m, n = ref.shape
    err = max(rel_err(got, ref) for got in run_once(dev, launch, y, m, n, copies))
    if not err <= TOL:
        raise CheckFailed(f"{name}: max_rel_err {err:.3g} > {TOL:g} against the float64 reference")
    return err


class TorchBaseline:
    """W copies (and a bias) of one dtype for F.linear, rotated like ours."""

    def __init__(self, dtype, n: int, k: int, l2_bytes: int, seed: int):
        g = torch.Generator(device=TORCH_DEVICE).manual_seed(seed)
        size = torch.tensor([], dtype=dtype).element_size()
        self.dtype, self.n, self.k, self.nbytes = dtype, n, k, (n * k + n) * size  # W and bias
        self.copies = copies_for(self.nbytes, l2_bytes)
        self.w = [torch.randn(n, k, generator=g, device=TORCH_DEVICE, dtype=dtype) / k**0.5 for _ in range(self.copies)]
        self.b = torch.randn(n, generator=g, device=TORCH_DEVICE, dtype=dtype)

    def entry(self, x: np.ndarray, calls: int) -> Entry:
        xt = torch.from_numpy(np.ascontiguousarray(x)).to(TORCH_DEVICE, self.dtype)
        f, w, b = torch.nn.functional.linear, self.w, self.b
        return entry(f"torch_{str(self.dtype).split('.')[-1]}", lambda i, s: f(xt, w[i % len(w)], b),
                     self.copies, calls)


def upload_all(dev, lib: CudaLibrary, layers: dict[str, CompressedLayer]) -> dict[tuple[str, str], list[CudaPackedWeights]]:
    """Every (weights, layout) of KINDS packed once and uploaded in copies_for() copies."""
    out = {}
    for kind in KINDS:
        key = (kind.weights, kind.layout)
        if key not in out:
            layer = layers[kind.weights]
            packed = kernel_pack(layer, kind.layout)
            up = (lambda: CudaPackedWeights(lib, layer, packed=packed, put=dev.put))
            first = up()
            out[key] = [first] + [up() for _ in range(copies_for(first.device_bytes, dev.l2_bytes) - 1)]
    return out


def references(layers: dict[str, CompressedLayer], act: Activations) -> dict[str, np.ndarray]:
    """float64 y of every kind for the largest M (rows are independent: slice for smaller M)."""
    return {kind.name: reference_xnor(layers[kind.weights], act.x, act.xbs) if kind.op == "bgemm" else
            reference(layers[kind.weights], kind.layout, act.xq, act.xs) for kind in KINDS}


def bench_shape(dev, lib, n: int, k: int, cfg) -> tuple[list[dict], list[dict]]:
    """Rows (ours, one per kind x M) and baselines (torch, one per dtype x M) of one shape."""
    layers = make_layers(n, k, cfg.seed)
    weights = upload_all(dev, lib, layers)
    act = Activations(np.random.default_rng(cfg.seed + n + 3 * k).standard_normal((max(cfg.batch), k))
                      .astype(np.float32))
    refs = references(layers, act)
    torch_w = [] if dev.emulation else [TorchBaseline(dt, n, k, dev.l2_bytes, cfg.seed)
                                        for dt in (torch.float16, torch.float32)]
    rows, baselines = [], []
    for m in cfg.batch:
        log(f"  {n}x{k} M={m}")
        r, b = bench_batch(dev, lib, weights, refs, act, m, torch_w, cfg)
        rows += r
        baselines += b
    return rows, baselines


def bench_batch(dev, lib, weights, refs, act: Activations, m: int, torch_w, cfg) -> tuple[list[dict], list[dict]]:
    """Check every kind at batch M, then time ours and torch's interleaved."""
    a, k = act.on_device(dev, m), act.x.shape[1]
    cells, entries = [], []
    for kind in KINDS:
        ws, ref = weights[(kind.weights, kind.layout)], refs[kind.name][:m]
        y = dev.empty(ref.shape, np.float32)
        ko = entry(kind.name, kernel_launch(lib, kind, ws, m, a, y), len(ws), cfg.calls)
        err = check(dev, kind.name, ko.launch, y, ref, len(ws))
        e2e = err_e2e = None
        if kind.op == "i8":
            e2e = entry(kind.name + "_e2e", e2e_launch(lib, ws, m, k, a, y), len(ws), cfg.calls)
            err_e2e = check(dev, e2e.name, e2e.launch, y, ref, 1)
        entries += [e for e in (ko, e2e) if e]
        cells.append((kind, ws, ko, e2e, err, err_e2e))
    base = [tw.entry(act.x[:m], cfg.calls) for tw in torch_w]
    measure(dev, entries + base, cfg)
    baselines = [baseline_row(tw, e, m, cfg.graph) for tw, e in zip(torch_w, base)]
    fp = {b["name"]: b for b in baselines}
    return [row(*cell, m, fp, cfg.graph) for cell in cells], baselines


def baseline_row(tw: TorchBaseline, e: Entry, m: int, graph: bool) -> dict:
    t = timing(e, graph)
    return {"name": e.name, "m": m, "n": tw.n, "k": tw.k, "weight_bytes": tw.nbytes, "copies": e.copies,
            "calls_per_sample": e.calls, **t, "gbps": tw.nbytes / t["median_us"] / 1e3}


def _ratio(base: dict | None, ours: dict | None, graph: bool = False) -> float | None:
    if graph:
        base, ours = (base or {}).get("graph"), (ours or {}).get("graph")
    if not base or not ours or "median_us" not in base or "median_us" not in ours:
        return None
    return base["median_us"] / ours["median_us"]


def row(kind: Kind, ws, ko: Entry, e2e: Entry | None, err, err_e2e, m, fp: dict, graph: bool) -> dict:
    w = ws[0]
    r = {"kind": kind.name, "title": kind.title, "layout": kind.layout, "op": kind.op, "m": m, "n": w.n, "k": w.k,
         "weight_bytes": w.device_bytes, "copies": len(ws), "calls_per_sample": ko.calls,
         "kernel_only": timing(ko, graph), "end_to_end": timing(e2e, graph),
         "max_rel_err": err, "max_rel_err_e2e": err_e2e}
    if e2e is None:
        r["end_to_end_note"] = XNOR_NOTE
    r["gbps"] = w.device_bytes / r["kernel_only"]["median_us"] / 1e3
    for dt in ("float16", "float32"):
        b, short = fp.get(f"torch_{dt}"), dt.replace("float", "fp")
        r[f"{short}_us"] = b["median_us"] if b else None
        r[f"ratio_{short}"] = _ratio(b, r["kernel_only"])
        r[f"ratio_{short}_e2e"] = _ratio(b, r["end_to_end"])
        r[f"ratio_{short}_graph"] = _ratio(b, r["kernel_only"], graph=True)
    return r


# ------------------------------------------------------------------------------ goals, report

def _basis_ratio(r: dict) -> tuple[float | None, str]:
    """Goal basis: kernel only, graph replays where they worked, else eager."""
    if r.get("ratio_fp16_graph") is not None:
        return r["ratio_fp16_graph"], "kernel only (int8 activations on the device), CUDA graph replays"
    return r.get("ratio_fp16"), "kernel only (int8 activations on the device), eager launches"


def goals(rows: list[dict]) -> list[dict]:
    def goal(text, target, candidates):
        cand = [(r, *_basis_ratio(r)) for r in candidates]
        cand = [c for c in cand if c[1] is not None]
        if not cand:
            return {"goal": text, "target": target, "measured": None, "met": None,
                    "status": "not_measured (no torch baseline in this run)" if candidates else "not_measured"}
        r, ratio, basis = max(cand, key=lambda c: c[1])
        return {"goal": text, "target": target, "measured": ratio, "met": ratio >= target, "basis": basis,
                "row": f"{r['kind']} M={r['m']} {r['n']}x{r['k']}", "ratio_e2e": r["ratio_fp16_e2e"],
                "ratio_eager": r["ratio_fp16"]}

    def at(kind, **kw):
        return [r for r in rows if r["kind"] == kind and r["m"] == 1 and all(r[key] == v for key, v in kw.items())]
    return [goal("1-bit GEMV 4096x4096 >= 8x torch fp16 at batch 1", 8.0, at("1bit_i8", n=4096, k=4096)),
            goal("int4 50%-sparse >= 2x torch fp16", 2.0, at("4bit_sparse50_i8"))]


def _us(t: dict | float | None, key: str = "median_us") -> str:
    if isinstance(t, dict):
        t = "failed" if "error" in t else t[key]
    return "-" if t is None else t if isinstance(t, str) else f"{t:.2f}"


def _x(v) -> str:
    return "-" if v is None else f"{v:.2f}x"


def table(doc: dict) -> str:
    head = (f"CUDA GEMM benchmark on {doc['device']} ({doc['library']}), torch {doc['torch']} "
            f"(CUDA {doc['cuda']}), L2 {doc['l2_bytes'] / 2**20:.3g} MiB ({doc['l2_source']}); medians, us per call")
    lines = [head]
    if doc["emulation"]:
        lines.append("HOST EMULATION: the timings below are meaningless (plumbing and correctness check only).")
    lines += ["", ("| kind | M | N x K | kernel us (p10-p90) | e2e us | graph us | fp16 us | fp32 us | x fp16 "
                   "| x fp32 | e2e x fp16 | graph x fp16 | MB | GB/s | max rel err |"), "|" + "---|" * 15]
    for r in doc["rows"]:
        ko = r["kernel_only"]
        lines.append(
            f"| {r['kind']} | {r['m']} | {r['n']}x{r['k']} | {_us(ko)} ({_us(ko, 'p10_us')}-{_us(ko, 'p90_us')}) "
            f"| {_us(r['end_to_end'])} | {_us(ko.get('graph'))} | {_us(r['fp16_us'])} | {_us(r['fp32_us'])} "
            f"| {_x(r['ratio_fp16'])} "
            f"| {_x(r['ratio_fp32'])} | {_x(r['ratio_fp16_e2e'])} | {_x(r['ratio_fp16_graph'])} "
            f"| {r['weight_bytes'] / 1e6:.2f} | {r['gbps']:.0f} | {r['max_rel_err']:.1e} |")
    lines += ["", f"xnor: {XNOR_NOTE}."]
    errors = {t["graph"]["error"] for r in doc["rows"] for t in (r["kernel_only"], r["end_to_end"])
              if t and "error" in t.get("graph", {})}
    lines += [f"graph capture failed: {e}" for e in sorted(errors)]
    for b in doc["baselines"]:
        g = b.get("graph")
        lines.append(f"{b['name']} M={b['m']} {b['n']}x{b['k']}: {_us(b)} us (p10-p90 {_us(b, 'p10_us')}-"
                     f"{_us(b, 'p90_us')}), graph {_us(g)} us, {b['gbps']:.0f} GB/s, {b['copies']} copies")
    lines.append("")
    for g in doc["goals"]:
        meas = "-" if g["measured"] is None else f"{g['measured']:.2f}x ({g['basis']}; {g['row']})"
        lines.append(f"goal: {g['goal']}: {meas}: {'met' if g['met'] else g.get('status', 'missed')}")
    return "\n".join(lines)


# ------------------------------------------------------------------------------ main

def environment(dev) -> dict:
    env = {"python": platform.python_version(), "numpy": np.__version__, "platform": platform.platform(),
           "cpu_count": os.cpu_count(), "loadavg_start": list(os.getloadavg()) if hasattr(os, "getloadavg") else None}
    if not dev.emulation:
        p = dev.props
        env.update(gpu=p.name, sm_count=p.multi_processor_count, gpu_memory_bytes=p.total_memory,
                   capability=f"{p.major}.{p.minor}", allow_tf32=torch.backends.cuda.matmul.allow_tf32)
    return env


def log(msg: str) -> None:
    print(msg, file=sys.stderr, flush=True)


def no_gpu_reason() -> str | None:
    """Why torch cannot run CUDA here (None when it can); torch's warnings become the reason."""
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        if torch.cuda.is_available():
            return None
    why = f"torch {torch.__version__} sees no CUDA device" + ("" if torch.version.cuda else ", built without CUDA")
    return "; ".join([why] + [str(w.message).splitlines()[0] for w in caught if str(w.message)])


def open_device(emulate: bool) -> tuple[CudaLibrary, Any]:
    """Build (or reuse) and load the library; the device wrapper of the mode."""
    lib = CudaLibrary(cuda_library.build(get_target("cuda"), emulate=emulate))
    if emulate:
        return lib, EmulatedDevice(lib)
    why = lib.unavailable()
    if why:
        raise NoGpu(f"the kernel library: {why}")
    return lib, GpuDevice()


def parse_args(argv):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--shapes", choices=tuple(SHAPES), default="quick", help="quick: 4096x4096; full: + 11008")
    ap.add_argument("--batch", default=None, help="M values, comma separated (GPU 1,8,64; emulation 1,3)")
    ap.add_argument("--repeat", type=int, default=None, help="samples per entry (GPU 30)")
    ap.add_argument("--calls", type=int, default=None, help="calls per sample, rounded up to the copies (GPU 100)")
    ap.add_argument("--warmup", type=int, default=None, help="untimed loops per entry (GPU 3)")
    ap.add_argument("--graph", action="store_true", help="also time CUDA graph replays of each loop")
    ap.add_argument("--emulation", action="store_true", help="tiny shapes on the host-emulation library (no GPU)")
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("-o", "--out", default=None,
                    help="JSON (default benchmarks/results/cuda_gemm.json, _emulation.json with --emulation)")
    args = ap.parse_args(argv)
    d = DEFAULTS["emulation" if args.emulation else "gpu"]
    for key in ("repeat", "calls", "warmup"):
        if getattr(args, key) is None:
            setattr(args, key, d[key])
    args.batch = [int(v) for v in (args.batch or d["batch"]).split(",")]
    args.out = Path(args.out or ROOT / "benchmarks" / "results" /
                    ("cuda_gemm_emulation.json" if args.emulation else "cuda_gemm.json"))
    return args


def new_doc(lib: CudaLibrary, dev, shapes, args) -> dict:
    return {"schema": SCHEMA, "date": _dt.datetime.now(_dt.UTC).isoformat(timespec="seconds"),
            "emulation": dev.emulation, "device": lib.device_name(0), "library": lib.info,
            "torch": torch.__version__, "cuda": torch.version.cuda, "method": METHOD, "l2_bytes": dev.l2_bytes,
            "l2_source": "nominal (emulation)" if dev.emulation else "torch L2_cache_size",
            "config": {"shapes": [list(s) for s in shapes], "batch": args.batch, "repeat": args.repeat,
                       "calls": args.calls, "warmup": args.warmup, "graph": args.graph, "seed": args.seed,
                       "tolerance": TOL},
            "environment": environment(dev), "rows": [], "baselines": []}


def main(argv=None) -> int:
    args = parse_args(argv)
    t0 = time.time()
    try:
        if not args.emulation and no_gpu_reason():
            raise NoGpu(no_gpu_reason())
        lib, dev = open_device(args.emulation)
    except NoGpu as exc:
        print(f"cuda_gemm: no CUDA GPU here ({exc}): nothing measured", file=sys.stderr)
        return 2
    except SpfqError as exc:  # nvcc missing or failing, a library that does not load
        print(f"cuda_gemm: the CUDA kernel library is not usable: {exc}", file=sys.stderr)
        return 1
    shapes = EMULATION_SHAPES if args.emulation else SHAPES[args.shapes]
    doc, status = new_doc(lib, dev, shapes, args), 0
    try:
        for n, k in shapes:
            rows, baselines = bench_shape(dev, lib, n, k, args)
            doc["rows"] += rows
            doc["baselines"] += baselines
    except CheckFailed as exc:
        doc["failed"] = str(exc)
        print(f"cuda_gemm: CORRECTNESS CHECK FAILED: {exc}", file=sys.stderr)
        status = 1
    doc["goals"] = goals(doc["rows"])
    doc["environment"]["loadavg_end"] = list(os.getloadavg()) if hasattr(os, "getloadavg") else None
    doc["wall_s"] = time.time() - t0
    args.out.parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps(doc, indent=1))
    if status == 0:
        print(table(doc))
    print(f"wrote {args.out} ({doc['wall_s']:.0f} s)", file=sys.stderr)
    return status


if __name__ == "__main__":
    sys.exit(main())
