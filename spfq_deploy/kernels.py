"""ctypes binding of the packed GEMM kernels (kernels/include/spfq_kernels.h).

The library is built by the package build (setup.py) next to this file. Every call checks
dtypes, shapes, contiguity and alignment here, so a bad argument raises KernelError (a
ValueError) instead of letting C read out of bounds.
"""

from __future__ import annotations

import ctypes as C
import glob
import os

import numpy as np

from .compressed import CompressedLayer
from .pack import layouts as L

SIGN, SIGN_MASK, PLANES, SPARSE = 1, 2, 3, 4
LAYOUT_IDS = {"sign": SIGN, "sign_mask": SIGN_MASK, "planes": PLANES, "sparse": SPARSE}
_STATUS = {1: "invalid argument", 2: "out of memory", 3: "not supported for this layout / ISA"}


class KernelError(ValueError):
    """A bad argument to a kernel (dtype, shape, alignment) or a status the library returned."""


class Act(C.Structure):
    """spfq_act: float rows, or int8 rows with one scale per row, in and out of a call."""
    _fields_ = [("x", C.c_void_p), ("xq", C.c_void_p), ("xscale", C.c_void_p), ("y", C.c_void_p),
                ("yq", C.c_void_p), ("yscale", C.c_void_p)]


class WeightsDesc(C.Structure):
    _fields_ = [("layout", C.c_int32), ("n", C.c_int32), ("k", C.c_int32), ("bits", C.c_int32),
                ("kept_words", C.c_int32), ("sign", C.c_void_p), ("mask", C.c_void_p),
                ("planes", C.c_void_p), ("scale", C.c_void_p), ("lam", C.c_void_p),
                ("bias", C.c_void_p)]


def library_path() -> str:
    here = os.path.dirname(os.path.abspath(__file__))
    hits = sorted(glob.glob(os.path.join(here, "_spfq_kernels*.so")))
    if not hits:
        raise KernelError("the kernel library is not built: run `pip install -e .` (or `make setup`)")
    return hits[0]


_lib = None


def lib() -> C.CDLL:
    """The loaded library (loaded once)."""
    global _lib
    if _lib is None:
        so = C.CDLL(library_path())
        p, i32, vp = C.c_void_p, C.c_int32, C.c_void_p
        sig = {
            "spfq_prepare": ([C.POINTER(WeightsDesc), C.POINTER(p)], C.c_int),
            "spfq_free": ([p], None),
            "spfq_matmul_f32": ([p, i32, vp, vp, i32], C.c_int),
            "spfq_matmul_i8_raw": ([p, i32, vp, vp, vp, i32], C.c_int),
            "spfq_matmul_i8": ([p, i32, vp, vp, vp, i32], C.c_int),
            "spfq_matmul_q8": ([p, i32, vp, vp, i32], C.c_int),
            "spfq_matmul_act": ([p, i32, C.POINTER(Act), i32], C.c_int),
            "spfq_dwconv_nhwc_act": ([p, i32, i32, i32, i32, C.POINTER(Act), i32], C.c_int),
            "spfq_bgemm": ([p, i32, vp, vp, vp, vp, vp, i32], C.c_int),
            "spfq_quantize_i8": ([i32, i32, vp, vp, vp], C.c_int),
            "spfq_binarize": ([i32, i32, vp, vp, vp], C.c_int),
            "spfq_set_isa": ([C.c_char_p], C.c_int),
            "spfq_isa": ([], C.c_char_p),
            "spfq_abi_version": ([], i32),
            "spfq_dw_prepare": ([C.POINTER(WeightsDesc), C.POINTER(DwGeom), C.POINTER(p)], C.c_int),
            "spfq_dw_free": ([p], None),
            "spfq_dwconv": ([p, i32, i32, i32, i32, vp, vp, i32], C.c_int),
            "spfq_dwconv_nhwc": ([p, i32, i32, i32, i32, vp, vp, i32], C.c_int),
            "spfq_set_clamp": ([p, C.c_float, C.c_float], C.c_int),
            "spfq_dw_set_clamp": ([p, C.c_float, C.c_float], C.c_int),
            "spfq_dc_prepare": ([C.POINTER(WeightsDesc), C.POINTER(ConvGeom), C.POINTER(p)], C.c_int),
            "spfq_dc_free": ([p], None),
            "spfq_dc_set_clamp": ([p, C.c_float, C.c_float], C.c_int),
            "spfq_set_activation": ([p, i32, vp], C.c_int),
            "spfq_dw_set_activation": ([p, i32, vp], C.c_int),
            "spfq_dc_set_activation": ([p, i32, vp], C.c_int),
            "spfq_dconv": ([p, i32, i32, i32, i32, vp, vp, i32], C.c_int),
            "spfq_conv_nhwc": ([p, C.POINTER(ConvGeom), i32, i32, i32, i32, vp, vp, i32], C.c_int),
            "spfq_grouped_prepare": ([C.POINTER(WeightsDesc), i32, C.POINTER(p)], C.c_int),
            "spfq_grouped_free": ([p], None),
            "spfq_grouped_set_clamp": ([p, C.c_float, C.c_float], C.c_int),
            "spfq_grouped_set_activation": ([p, i32, vp], C.c_int),
            "spfq_grouped_matmul_f32": ([p, i32, vp, vp, i32], C.c_int),
            "spfq_grouped_matmul_i8": ([p, i32, vp, vp, vp, i32], C.c_int),
            "spfq_grouped_matmul_q8": ([p, i32, vp, vp, i32], C.c_int),
        }
        for name, (args, res) in sig.items():
            fn = getattr(so, name)
            fn.argtypes, fn.restype = args, res
        _lib = so
    return _lib


def _ok(status: int, what: str) -> None:
    if status:
        raise KernelError(f"{what}: {_STATUS.get(status, f'status {status}')}")


def _arr(a, dtype, shape, name, align=8):
    """Check a caller's array: exact dtype, shape, C-contiguous, aligned; returns its address."""
    if not isinstance(a, np.ndarray):
        raise KernelError(f"{name} must be a numpy array, got {type(a).__name__}")
    if a.dtype != np.dtype(dtype):
        raise KernelError(f"{name} must be {np.dtype(dtype)}, got {a.dtype}")
    if tuple(a.shape) != tuple(shape):
        raise KernelError(f"{name} must have shape {tuple(shape)}, got {tuple(a.shape)}")
    if not a.flags.c_contiguous:
        raise KernelError(f"{name} must be C-contiguous")
    if a.ctypes.data % align:
        raise KernelError(f"{name} is not {align}-byte aligned")
    return a.ctypes.data if a.size else None


def set_isa(name: str) -> None:
    """'auto', 'c', 'avx2' or 'neon'."""
    _ok(lib().spfq_set_isa(name.encode()), f"ISA {name!r}")


def isa() -> str:
    return lib().spfq_isa().decode()


# The int8 activation quantiser the kernels implement (kernels/src/quant.c: x * (127 / amax)
# rounded to nearest even); export manifests record it, validate picks the matching reference
# (spfq_deploy.reference.quantize_rows_i8; manifests without the record used rule 1).
INT8_QUANTIZER = 2

# Int-code layers run on the dense bit-plane kernel (which also handles lam) unless at least this
# fraction of the weights is zero: the sparse kernel is slower than the dense one below that
# (benchmarks/results/kernels.json: 4-bit 50% sparse is several times slower than dense planes).
SPARSE_MIN = 0.9


def preferred_layout(layer: CompressedLayer) -> str:
    """The kernel layout exported artifacts use for a layer (ONNX custom ops, TVM libraries)."""
    if layer.alphabet in ("binary", "ternary"):
        return L.default_layout(layer)
    return "sparse" if layer.lam is not None and layer.sparsity >= SPARSE_MIN else "planes"


def kernel_pack(layer: CompressedLayer, layout: str, groups_ok: bool = False) -> tuple[str, int, dict]:
    """(layout, field bits, packed buffers) of a layer as the kernel ABI takes them; a *_rows
    layout (a file's, rows back to back) gives its padded twin, the words the kernels walk.
    A layer with group-wise scales is refused unless groups_ok (GroupedWeights takes them)."""
    if layout in L.LAYOUTS and L.LAYOUTS[layout].padded:
        layout = L.LAYOUTS[layout].padded
    if layout not in LAYOUT_IDS:
        raise KernelError(f"kernels take layouts {', '.join(LAYOUT_IDS)}, not {layout!r}")
    if layer.group_size and not groups_ok:  # spfq_prepared has one scale (and lam) per output row
        raise KernelError(f"{layer.name}: group-wise scales (group size {layer.group_size}) are not implemented "
                          "in these kernels (one scale per output row): use kernels.GroupedWeights")
    bits = L.field_bits(layer) if layout in ("planes", "sparse") else (1 if layout == "sign" else 2)
    return layout, bits, L.pack_layer(layer, layout)


def check_sparse_buffers(mask: np.ndarray, kept: np.ndarray, k: int) -> None:
    """KernelError naming the row where a SPARSE mask and its kept codes disagree: the kernels
    would read a missing code as 0 (or a stray one never), i.e. compute with wrong weights."""
    try:
        L.check_sparse(mask, kept, k)
    except ValueError as e:
        raise KernelError(f"sparse weights: {e}") from None


def _weights_desc(layout: str, n: int, k: int, buffers: dict, scale, lam, bias, bits: int, ngroups: int = 0):
    """The WeightsDesc of packed buffers, and the arrays it points into (keep them alive until
    the library has copied them). ngroups > 0: scale and lam are (n, ngroups) group-wise scales."""
    if layout not in LAYOUT_IDS:
        raise KernelError(f"kernels take layouts {', '.join(LAYOUT_IDS)}, not {layout!r}")
    W = (k + 63) // 64
    keep = []

    def f32(v, name):
        if v is None:
            return None
        v = np.ascontiguousarray(v, dtype=np.float32)
        keep.append(v)
        return _arr(v, np.float32, (n, ngroups) if ngroups and name != "bias" else (n,), name, 4)

    d = WeightsDesc(layout=LAYOUT_IDS[layout], n=n, k=k, bits=bits, kept_words=0)
    if layout in ("sign", "sign_mask"):
        d.sign = _arr(buffers["sign"], np.uint64, (n, W), "sign")
    if layout in ("sign_mask", "sparse"):
        d.mask = _arr(buffers["mask"], np.uint64, (n, W), "mask")
    if layout == "planes":
        d.planes = _arr(buffers["planes"], np.uint64, (bits, n, W), "planes")
    if layout == "sparse":
        kept = buffers["kept"]
        if kept.ndim != 3:
            raise KernelError("kept must be (bits, N, Wk)")
        d.kept_words = kept.shape[2]
        d.planes = _arr(kept, np.uint64, (bits, n, kept.shape[2]), "kept")
        check_sparse_buffers(buffers["mask"], kept, k)
    d.scale, d.lam, d.bias = f32(scale, "scale"), f32(lam, "lam"), f32(bias, "bias")
    if d.scale is None:
        raise KernelError("scale is required")
    return d, keep


class _Rows:
    """The calls a prepared weight set of either kind takes (C functions `_C` + name: spfq_ for
    PackedWeights, spfq_grouped_ for GroupedWeights); subclasses set _h, n, k."""

    _C = ""

    def _fn(self, name):
        return getattr(lib(), self._C + name), self._C[len("spfq_"):] + name

    def __del__(self):
        h = getattr(self, "_h", None)
        if h is not None and h.value and _lib is not None:
            getattr(_lib, self._C + "free")(h)
            self._h = None

    def _x(self, x, dtype, name):
        if not isinstance(x, np.ndarray) or x.ndim != 2:
            raise KernelError(f"{name} must be a 2-D numpy array (M, K)")
        if x.shape[1] != self.k:
            raise KernelError(f"{name} has K = {x.shape[1]}, the weights have K = {self.k}")
        return _arr(x, dtype, x.shape, name, np.dtype(dtype).itemsize)

    def set_clamp(self, lo: float = -np.inf, hi: float = np.inf) -> None:
        """Fuse y = min(max(y, lo), hi) into the epilogue (ReLU: lo = 0; ReLU6: 0, 6)."""
        fn, what = self._fn("set_clamp")
        _ok(fn(self._h, lo, hi), what)

    def set_activation(self, kind: str | None, slope=None) -> None:
        """Fuse an activation after the clamp: 'hardswish', 'silu', 'prelu' (slope: one per
        output), None: off."""
        _set_activation(self._C + "set_activation", self._h, self.n, kind, slope)

    def matmul_f32(self, x: np.ndarray, threads: int = 1) -> np.ndarray:
        """Weight-only: x (M, K) float32 -> (M, N)."""
        px = self._x(x, np.float32, "x")
        y = np.empty((x.shape[0], self.n), np.float32)
        fn, what = self._fn("matmul_f32")
        _ok(fn(self._h, x.shape[0], px, y.ctypes.data, threads), what)
        return y

    def matmul_i8(self, xq: np.ndarray, xscale: np.ndarray, threads: int = 1) -> np.ndarray:
        px = self._x(xq, np.int8, "xq")
        ps = _arr(xscale, np.float32, (xq.shape[0],), "xscale", 4)
        y = np.empty((xq.shape[0], self.n), np.float32)
        fn, what = self._fn("matmul_i8")
        _ok(fn(self._h, xq.shape[0], px, ps, y.ctypes.data, threads), what)
        return y

    def matmul_q8(self, x: np.ndarray, threads: int = 1) -> np.ndarray:
        """x (M, K) float32 quantised per row inside the call: quantize_i8 + matmul_i8 in one."""
        px = self._x(x, np.float32, "x")
        y = np.empty((x.shape[0], self.n), np.float32)
        fn, what = self._fn("matmul_q8")
        _ok(fn(self._h, x.shape[0], px, y.ctypes.data, threads), what)
        return y


class GroupedWeights(_Rows):
    """A layer with group-wise scales (--group-size) handed to the kernels (spfq_grouped_*: each
    group's columns run the per-row-scale kernels, float outputs summed in group order; the exact
    order is in spfq_kernels.h)."""

    def __init__(self, layout: str, n: int, k: int, group: int, buffers: dict, scale, lam=None, bias=None,
                 bits: int = 1):
        self.layout, self.n, self.k, self.group, self.bits = layout, n, k, group, bits
        if isinstance(group, bool) or not isinstance(group, int) or group < 1:
            raise KernelError(f"group must be a positive integer, got {group!r}")
        d, keep = _weights_desc(layout, n, k, buffers, scale, lam, bias, bits, ngroups=-(-k // group))
        handle = C.c_void_p()
        _ok(lib().spfq_grouped_prepare(C.byref(d), group, C.byref(handle)), "grouped_prepare")
        del keep
        self._h = handle

    @classmethod
    def from_layer(cls, layer: CompressedLayer, layout: str | None = None) -> "GroupedWeights":
        if not layer.group_size:
            raise KernelError(f"{layer.name}: no group-wise scales (use PackedWeights)")
        layout, bits, bufs = kernel_pack(layer, layout or L.default_layout(layer), groups_ok=True)
        return cls(layout, layer.rows, layer.cols, layer.group_size, bufs, layer.scale, layer.lam, layer.bias, bits)

    _C = "spfq_grouped_"


def _act_in(a: "Act", x, check) -> tuple[int, list]:
    """Set a's input side from float x (M, K) or (xq, xscale); (rows, arrays to keep alive)."""
    if isinstance(x, tuple):
        xq, xs = x
        a.xq = check(xq, np.int8, "xq")
        a.xscale = _arr(xs, np.float32, (xq.shape[0],), "xscale", 4)
        return xq.shape[0], [xq, xs]
    a.x = check(x, np.float32, "x")
    return x.shape[0], [x]


def _act_out(a: "Act", m: int, n: int, q8: bool):
    """Allocate and set a's output side: y (m, n), or (yq, yscale)."""
    if not q8:
        y = np.empty((m, n), np.float32)
        a.y = y.ctypes.data
        return y
    yq, ys = np.empty((m, n), np.int8), np.empty(m, np.float32)
    a.yq, a.yscale = yq.ctypes.data, ys.ctypes.data
    return yq, ys


class PackedWeights(_Rows):
    """A layer's packed weights handed to the kernels once (they keep their own copy)."""

    def __init__(self, layout: str, n: int, k: int, buffers: dict, scale, lam=None, bias=None, bits: int = 1):
        self.layout, self.n, self.k, self.bits = layout, n, k, bits
        d, keep = _weights_desc(layout, n, k, buffers, scale, lam, bias, bits)
        handle = C.c_void_p()
        _ok(lib().spfq_prepare(C.byref(d), C.byref(handle)), "prepare")
        del keep  # spfq_prepare has copied them
        self._h = handle

    @classmethod
    def from_layer(cls, layer: CompressedLayer, layout: str | None = None) -> "PackedWeights":
        """Pack a compressed layer in the .spfq layout and hand it to the kernels."""
        layout, bits, bufs = kernel_pack(layer, layout or L.default_layout(layer))
        return cls(layout, layer.rows, layer.cols, bufs, layer.scale, layer.lam, layer.bias, bits)

    _C = "spfq_"

    def matmul_i8_raw(self, xq: np.ndarray, threads: int = 1) -> tuple[np.ndarray, np.ndarray]:
        """Exact int32 (acc_c, acc_s) of int8 activations (M, K)."""
        px = self._x(xq, np.int8, "xq")
        acc_c = np.empty((xq.shape[0], self.n), np.int32)
        acc_s = np.empty_like(acc_c)
        _ok(lib().spfq_matmul_i8_raw(self._h, xq.shape[0], px, acc_c.ctypes.data, acc_s.ctypes.data, threads),
            "matmul_i8_raw")
        if self.layout in ("sign", "sign_mask"):
            acc_c[...] = acc_s  # c == sign(c) for binary / ternary codes
        return acc_c, acc_s

    def matmul_act(self, x: np.ndarray | tuple, q8_out: bool = False, threads: int = 1):
        """x: float32 (M, K), or (xq int8 (M, K), xscale float32 (M,)); returns y float32 (M, N),
        or (yq int8 (M, N), yscale (M,)) quantised per row in the epilogue (spfq_matmul_act)."""
        a = Act()
        keep = _act_in(a, x, self._x)
        y = _act_out(a, keep[0], self.n, q8_out)
        _ok(lib().spfq_matmul_act(self._h, keep[0], C.byref(a), threads), "matmul_act")
        return y

    def conv_nhwc(self, x: np.ndarray, geom: "ConvGeom", int8: bool, threads: int = 1) -> np.ndarray:
        """A one-group conv of channels-last x (B, H, W, C) -> (B, OH, OW, N) through this GEMM,
        im2col rows made per block inside the library (spfq_conv_nhwc)."""
        if not isinstance(x, np.ndarray) or x.ndim != 4 or x.shape[3] != geom.channels:
            raise KernelError(f"x must be a 4-D float32 (B, H, W, {geom.channels}) array")
        B, H, W, _ = x.shape
        oh = (H + geom.pt + geom.pb - geom.dh * (geom.kh - 1) - 1) // geom.sh + 1
        ow = (W + geom.pl + geom.pr - geom.dw * (geom.kw - 1) - 1) // geom.sw + 1
        if oh < 1 or ow < 1:
            raise KernelError("the input is smaller than the kernel")
        px = _arr(x, np.float32, x.shape, "x", 4)
        y = np.empty((B, oh, ow, self.n), np.float32)
        _ok(lib().spfq_conv_nhwc(self._h, C.byref(geom), int(int8), B, H, W, px, y.ctypes.data, threads), "conv_nhwc")
        return y

    def bgemm(self, xbits: np.ndarray, xscale: np.ndarray | None = None, threads: int = 1,
              rebinarize: bool = False):
        """XNOR/popcount: returns (dot int32 (M,N), y float32 (M,N)[, ybits uint64 (M, ceil(N/64))])."""
        if self.layout != "sign":
            raise KernelError("bgemm needs binary weights in the 'sign' layout")
        W = (self.k + 63) // 64
        if not isinstance(xbits, np.ndarray) or xbits.ndim != 2:
            raise KernelError("xbits must be a 2-D numpy array (M, W)")
        M = xbits.shape[0]
        px = _arr(xbits, np.uint64, (M, W), "xbits")
        ps = None if xscale is None else _arr(xscale, np.float32, (M,), "xscale", 4)
        dot = np.empty((M, self.n), np.int32)
        y = np.empty((M, self.n), np.float32)
        yb = np.zeros((M, (self.n + 63) // 64), np.uint64) if rebinarize else None
        _ok(lib().spfq_bgemm(self._h, M, px, ps, dot.ctypes.data, y.ctypes.data,
                             None if yb is None else yb.ctypes.data, threads), "bgemm")
        return (dot, y, yb) if rebinarize else (dot, y)



DC_MAX_CHANNELS = 4  # SPFQ_DC_MAX_C of kernels/src/internal.h


class ConvGeom(C.Structure):
    _fields_ = [(f, C.c_int32) for f in ("channels", "outputs", "kh", "kw", "sh", "sw", "dh", "dw",
                                         "pt", "pl", "pb", "pr")]


class DwGeom(C.Structure):
    _fields_ = [(f, C.c_int32) for f in ("channels", "mult", "kh", "kw", "sh", "sw", "dh", "dw",
                                         "pt", "pl", "pb", "pr")]


def is_depthwise(layer: CompressedLayer) -> bool:
    """One input channel per group (depthwise, or a conv of a 1-channel input): the layers the
    direct kernel spfq_dwconv runs in the exported runtimes instead of im2col GEMMs."""
    return bool(layer.conv) and layer.cols == int(np.prod(layer.conv["kernel_size"]))


def is_few_channel(layer: CompressedLayer) -> bool:
    """A conv of one group over at most DC_MAX_CHANNELS input channels (a first conv on an RGB or
    grey image) with a kernel larger than 1x1: the layers the direct kernel spfq_dconv runs (no
    im2col; takes precedence over the depthwise kernel for a 1-channel input)."""
    if not layer.conv or int(layer.conv["groups"]) != 1:
        return False
    taps = int(np.prod(layer.conv["kernel_size"]))
    return 1 < taps <= 64 and layer.cols % taps == 0 and layer.cols // taps <= DC_MAX_CHANNELS


def is_direct(layer: CompressedLayer) -> bool:
    """Layers the exported runtimes run through a direct conv kernel (depthwise or few-channel)."""
    return is_few_channel(layer) or is_depthwise(layer)


def layer_activation(layer: CompressedLayer, requested: str) -> str:
    """The activation mode a layer runs with when the export asks for `requested` ('int8' or
    'float'): direct-kernel layers stay weight-only float. A few-channel conv (a first conv)
    would quantise patches of C * KH * KW values (27), costing more than their multiply-adds; a
    depthwise conv's im2col rows are patches too, so per-row int8 would quantise every input once
    per tap (2.5-3x the float kernel's time on MobileNetV2). Measured on MobileNetV2 (AMX host,
    1 thread): quantising depthwise inputs per pixel instead, so that the 1x1 conv before could
    hand them over as int8, cost more in quantisation (the 6x-wide expansion tensors) than the
    smaller tensors saved (7.0 vs 5.4 ms); the int8 edges that pay are depthwise -> 1x1
    (export/onnx/q8.py). Every exporter and the validator's references follow this one rule (the
    manifests record it per layer)."""
    return "float" if requested == "int8" and is_direct(layer) else requested


class _DirectConv:
    """A direct-kernel conv layer's weights handed to the library once: the geometry, the
    prepare / free / clamp entry points of its kernel, and the input checks and output shape
    every call shares (NCHW, or channels last)."""

    _prepare = _free = _clamp = ""  # library entry points, set by each kernel's class

    def __init__(self, layer: CompressedLayer, layout: str | None, geom_type, first: int, second: int):
        layout, bits, bufs = kernel_pack(layer, layout or L.default_layout(layer))
        conv = layer.conv
        ks, st, dl, pd = (list(conv[k]) for k in ("kernel_size", "stride", "dilation", "padding"))
        if len(ks) == 1:  # 1-D: height 1
            ks, st, dl, pd = [1] + ks, [1] + st, [1] + dl, [0] + pd
        self.geom = geom_type(first, second, ks[0], ks[1], st[0], st[1], dl[0], dl[1], pd[0], pd[1], pd[0], pd[1])
        self.n, self.one_d = layer.rows, len(conv["kernel_size"]) == 1
        d, keep = _weights_desc(layout, layer.rows, layer.cols, bufs, layer.scale, layer.lam, layer.bias, bits)
        handle = C.c_void_p()
        _ok(getattr(lib(), self._prepare)(C.byref(d), C.byref(self.geom), C.byref(handle)), self._prepare)
        del keep
        self._h = handle

    def __del__(self):
        h = getattr(self, "_h", None)
        if h is not None and h.value and _lib is not None:
            getattr(_lib, self._free)(h)
            self._h = None

    def set_clamp(self, lo: float = -np.inf, hi: float = np.inf) -> None:
        _ok(getattr(lib(), self._clamp)(self._h, lo, hi), self._clamp)

    def set_activation(self, kind: str | None, slope=None) -> None:
        """As PackedWeights.set_activation."""
        _set_activation(self._clamp.replace("clamp", "activation"), self._h, self.n, kind, slope)

    def _shapes(self, x: np.ndarray, channels_last: bool) -> tuple[int, int, int, tuple]:
        """(H, W, input address, output shape) of a call, after checking x."""
        rank = 3 if self.one_d else 4
        if not isinstance(x, np.ndarray) or x.ndim != rank or x.shape[-1 if channels_last else 1] != self.channels:
            raise KernelError(f"x must be a {rank}-D float32 array with {self.channels} channels")
        g = self.geom
        spatial = x.shape[1:-1] if channels_last else x.shape[2:]
        H, W = (1, spatial[0]) if self.one_d else spatial
        oh = (H + g.pt + g.pb - g.dh * (g.kh - 1) - 1) // g.sh + 1
        ow = (W + g.pl + g.pr - g.dw * (g.kw - 1) - 1) // g.sw + 1
        if oh < 1 or ow < 1:
            raise KernelError("the input is smaller than the kernel")
        out = (ow,) if self.one_d else (oh, ow)
        shape = (x.shape[0], *out, self.n) if channels_last else (x.shape[0], self.n, *out)
        return H, W, _arr(x, np.float32, x.shape, "x", 4), shape


class DepthwiseWeights(_DirectConv):
    """A depthwise conv layer's weights unpacked once for spfq_dwconv (x NCHW -> y NCHW) and
    spfq_dwconv_nhwc (channels_last: x NHWC -> y NHWC)."""

    _prepare, _free, _clamp = "spfq_dw_prepare", "spfq_dw_free", "spfq_dw_set_clamp"

    def __init__(self, layer: CompressedLayer, layout: str | None = None):
        if not is_depthwise(layer):
            raise KernelError(f"layer {layer.name!r} is not depthwise (one input channel per group)")
        g = int(layer.conv["groups"])
        self.channels = g
        super().__init__(layer, layout, DwGeom, g, layer.rows // g)

    def __call__(self, x: np.ndarray, int8: bool = False, threads: int = 1,
                 channels_last: bool = False) -> np.ndarray:
        """x (B, C, H, W) (or (B, C, W) for 1-D) float32 -> y (B, N, OH, OW); channels_last:
        x (B, H, W, C) -> y (B, OH, OW, N)."""
        H, W, px, shape = self._shapes(x, channels_last)
        y = np.empty(shape, np.float32)
        fn = lib().spfq_dwconv_nhwc if channels_last else lib().spfq_dwconv
        _ok(fn(self._h, int(int8), x.shape[0], H, W, px, y.ctypes.data, threads), "dwconv")
        return y


class FewChannelWeights(_DirectConv):
    """A few-channel conv layer's weights unpacked once for spfq_dconv (NCHW or channels last)."""

    _prepare, _free, _clamp = "spfq_dc_prepare", "spfq_dc_free", "spfq_dc_set_clamp"

    def __init__(self, layer: CompressedLayer, layout: str | None = None):
        if not is_few_channel(layer):
            raise KernelError(f"layer {layer.name!r} is not a one-group conv over at most {DC_MAX_CHANNELS} channels")
        self.channels = layer.cols // int(np.prod(layer.conv["kernel_size"]))
        super().__init__(layer, layout, ConvGeom, self.channels, layer.rows)

    def __call__(self, x: np.ndarray, threads: int = 1, channels_last: bool = False) -> np.ndarray:
        """x (B, C, H, W) (or (B, C, W) for 1-D) float32 -> y (B, N, OH, OW); channels_last:
        x (B, H, W, C) -> y (B, OH, OW, N)."""
        H, W, px, shape = self._shapes(x, channels_last)
        y = np.empty(shape, np.float32)
        _ok(lib().spfq_dconv(self._h, int(channels_last), x.shape[0], H, W, px, y.ctypes.data, threads), "dconv")
        return y


def dwconv_act(dw: "DepthwiseWeights", x, shape, int8_pixel: bool = True, q8_out: bool = False, threads: int = 1):
    """A depthwise layer channels last through spfq_dwconv_nhwc_act: int8_pixel (the input
    quantised per pixel, then dequantised) or weight-only float; x float32 (B, H, W, C), or (xq
    int8 (B, H, W, C), xscale float32 (B, H, W)) with int8_pixel; shape = (B, H, W). Returns y
    float32 (B, OH, OW, N) or (yq int8 (B, OH, OW, N), yscale (B, OH, OW))."""
    B, H, W = shape
    C_ = dw.channels
    g = dw.geom
    oh = (H + g.pt + g.pb - g.dh * (g.kh - 1) - 1) // g.sh + 1
    ow = (W + g.pl + g.pr - g.dw * (g.kw - 1) - 1) // g.sw + 1
    if oh < 1 or ow < 1:
        raise KernelError("the input is smaller than the kernel")
    a = Act()
    if isinstance(x, tuple):
        a.xq = _arr(x[0], np.int8, (B, H, W, C_), "xq", 1)
        a.xscale = _arr(x[1], np.float32, (B, H, W), "xscale", 4)
    else:
        a.x = _arr(x, np.float32, (B, H, W, C_), "x", 4)
    y = _act_out(a, B * oh * ow, dw.n, q8_out)
    _ok(lib().spfq_dwconv_nhwc_act(dw._h, int(int8_pixel), B, H, W, C.byref(a), threads), "dwconv_nhwc_act")
    if q8_out:
        return y[0].reshape(B, oh, ow, dw.n), y[1].reshape(B, oh, ow)
    return y.reshape(B, oh, ow, dw.n)


def quantize_i8(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Per-row symmetric int8: (xq (M, K) int8, xscale (M,) float32)."""
    if not isinstance(x, np.ndarray) or x.ndim != 2:
        raise KernelError("x must be a 2-D numpy array (M, K)")
    _arr(x, np.float32, x.shape, "x", 4)
    xq = np.empty(x.shape, np.int8)
    s = np.empty(x.shape[0], np.float32)
    _ok(lib().spfq_quantize_i8(x.shape[0], x.shape[1], x.ctypes.data, xq.ctypes.data, s.ctypes.data), "quantize_i8")
    return xq, s


def binarize(x: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Sign bits (bit 1 = negative) packed like the weights, and per-row mean |x|."""
    if not isinstance(x, np.ndarray) or x.ndim != 2:
        raise KernelError("x must be a 2-D numpy array (M, K)")
    _arr(x, np.float32, x.shape, "x", 4)
    bits = np.empty((x.shape[0], (x.shape[1] + 63) // 64), np.uint64)
    s = np.empty(x.shape[0], np.float32)
    _ok(lib().spfq_binarize(x.shape[0], x.shape[1], x.ctypes.data, bits.ctypes.data, s.ctypes.data), "binarize")
    return bits, s


ACTIVATIONS = {None: 0, "hardswish": 1, "silu": 2, "prelu": 3}  # enum spfq_activation


def _set_activation(entry: str, handle, n: int, kind: str | None, slope) -> None:
    """One of the set_activation entry points; the PReLU slope checked and kept alive by copy."""
    if kind not in ACTIVATIONS:
        raise KernelError(f"unknown activation {kind!r}: one of hardswish, silu, prelu")
    ptr = None
    if kind == "prelu":
        s = np.ascontiguousarray(np.broadcast_to(np.asarray(slope, np.float32).reshape(-1), (n,)))
        ptr = s.ctypes.data  # the library copies it before returning
    _ok(getattr(lib(), entry)(handle, ACTIVATIONS[kind], ptr), entry)
