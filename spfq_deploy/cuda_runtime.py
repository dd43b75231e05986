"""ctypes binding of the CUDA kernel library (kernels/cuda/spfq_cuda.h) and a model runner that
puts every compressed layer on the GPU.

Device memory goes through the library's own helpers (spfq_cuda_alloc / copy_h2d / copy_d2h), so
neither torch nor any CUDA Python package is needed: the float ops between compressed layers run
in PyTorch on the host, each compressed layer uploads its input rows, quantises them to int8 on
the GPU (spfq_cuda_quantize_i8, bit-exact with the CPU quantiser), runs the packed GEMM and copies
y back. Weights are packed with the CPU kernel ABI (spfq_deploy.kernels.kernel_pack) and uploaded
unchanged: there is no GPU-only layout. The same code drives the host-emulation build of the
library (tests), whose device_name() says so.
"""

from __future__ import annotations

import copy
import ctypes as C
from pathlib import Path

import numpy as np
import torch
from torch import nn

from .compressed import CompressedLayer, CompressedModel, rows_slice
from .errors import SpfqError
from .kernels import LAYOUT_IDS, WeightsDesc, check_sparse_buffers, kernel_pack, preferred_layout

# Only numpy / torch / ctypes at import: the benchmark imports this on a GPU machine where the
# CPU kernel library is not built; the model-level pieces import what they need when used.

ABI_VERSION = 1
_STATUS = {1: "invalid argument", 2: "out of memory", 3: "not supported", 16: "CUDA error"}


class CudaError(SpfqError):
    """The CUDA library failed to load or returned an error status."""


class DeviceBuffer:
    """A device allocation owned by Python (freed when collected)."""

    def __init__(self, lib: "CudaLibrary", nbytes: int):
        self.lib, self.nbytes, self.ptr = lib, int(nbytes), None
        p = C.c_void_p()
        lib.ok(lib.so.spfq_cuda_alloc(C.byref(p), max(self.nbytes, 1)), f"alloc {self.nbytes} bytes")
        self.ptr = p.value

    def __del__(self):
        if self.ptr:
            self.lib.so.spfq_cuda_free(C.c_void_p(self.ptr))
            self.ptr = None


class CudaLibrary:
    """A loaded libspfq_cuda.so (the GPU build or its host emulation)."""

    def __init__(self, path: str | Path):
        try:
            so = C.CDLL(str(path))
        except OSError as exc:
            raise CudaError(f"{path}: cannot be loaded ({str(exc).splitlines()[0]})") from None
        vp, i32, sz = C.c_void_p, C.c_int32, C.c_size_t
        sig = {
            "spfq_cuda_abi_version": ([], i32), "spfq_cuda_library_info": ([], C.c_char_p),
            "spfq_cuda_device_count": ([], i32), "spfq_cuda_last_error": ([], C.c_char_p),
            "spfq_cuda_device_name": ([i32, C.c_char_p, sz], C.c_int), "spfq_cuda_set_device": ([i32], C.c_int),
            "spfq_cuda_alloc": ([C.POINTER(vp), sz], C.c_int), "spfq_cuda_free": ([vp], C.c_int),
            "spfq_cuda_copy_h2d": ([vp, vp, sz], C.c_int), "spfq_cuda_copy_d2h": ([vp, vp, sz], C.c_int),
            "spfq_cuda_memset": ([vp, C.c_int, sz], C.c_int), "spfq_cuda_synchronize": ([vp], C.c_int),
            "spfq_cuda_bgemm": ([i32] * 3 + [vp] * 9, C.c_int),
            "spfq_cuda_quantize_i8": ([i32, i32] + [vp] * 4, C.c_int),
        }
        for f in ("spfq_cuda_matmul_i8_raw", "spfq_cuda_matmul_sparse_i8_raw", "spfq_cuda_matmul_i8",
                  "spfq_cuda_matmul_sparse_i8"):
            sig[f] = ([C.POINTER(WeightsDesc), i32] + [vp] * 4, C.c_int)
        try:
            for name, (args, res) in sig.items():
                fn = getattr(so, name)
                fn.argtypes, fn.restype = args, res
        except AttributeError as exc:
            raise CudaError(f"{path}: not an spfq CUDA kernel library ({exc})") from None
        if so.spfq_cuda_abi_version() != ABI_VERSION:
            raise CudaError(f"{path}: kernel ABI {so.spfq_cuda_abi_version()}, this package speaks {ABI_VERSION}")
        self.so, self.path = so, Path(path)
        self.info = so.spfq_cuda_library_info().decode()
        self.emulation = "host emulation" in self.info

    # ---- status
    def last_error(self) -> str:
        return self.so.spfq_cuda_last_error().decode(errors="replace")

    def ok(self, status: int, what: str) -> None:
        if status:
            raise CudaError(f"CUDA kernels: {what}: {_STATUS.get(status, f'status {status}')}: {self.last_error()}")

    def device_count(self) -> int:
        return int(self.so.spfq_cuda_device_count())

    def unavailable(self) -> str | None:
        """None when a device can run the kernels, else why not (one line)."""
        if self.device_count() > 0:
            return None
        try:  # cudart calls a missing driver "insufficient": say what is missing
            C.CDLL("libcuda.so.1")
        except OSError:
            return "no CUDA GPU on this machine (no NVIDIA driver: libcuda.so.1 is not installed)"
        return f"no CUDA GPU on this machine ({self.last_error() or 'no device'})"

    def device_name(self, device: int = 0) -> str:
        buf = C.create_string_buffer(256)
        self.ok(self.so.spfq_cuda_device_name(device, buf, len(buf)), "device name")
        return buf.value.decode(errors="replace")

    # ---- memory
    def put(self, a: np.ndarray | None) -> DeviceBuffer | None:
        """A device copy of a host array (None stays None)."""
        if a is None:
            return None
        a = np.ascontiguousarray(a)
        buf = DeviceBuffer(self, a.nbytes)
        self.ok(self.so.spfq_cuda_copy_h2d(buf.ptr, a.ctypes.data, a.nbytes), "copy to device")
        return buf

    def empty(self, shape, dtype) -> DeviceBuffer:
        return DeviceBuffer(self, int(np.prod(shape, dtype=np.int64)) * np.dtype(dtype).itemsize)

    def get(self, buf: DeviceBuffer, shape, dtype) -> np.ndarray:
        """Wait for the device, copy buf back as a new host array."""
        host = np.empty(shape, dtype)
        self.ok(self.so.spfq_cuda_synchronize(None), "synchronize")
        if host.nbytes > buf.nbytes:
            raise CudaError(f"CUDA kernels: copy back of {host.nbytes} bytes from a {buf.nbytes}-byte buffer")
        self.ok(self.so.spfq_cuda_copy_d2h(host.ctypes.data, buf.ptr, host.nbytes), "copy to host")
        return host


class CudaPackedWeights:
    """One layer's packed weights on the device (the CPU kernel-ABI words, uploaded as they are).

    packed: kernel_pack's (layout, bits, buffers) when the caller has packed already (the
    benchmark uploads many copies of one packing); put: the allocator, any callable taking a host
    array and returning an object with .ptr and .nbytes that owns the memory (default lib.put;
    the benchmark passes torch CUDA tensors)."""

    ROLES = ("sign", "mask", "planes", "scale", "lam", "bias")

    def __init__(self, lib: CudaLibrary, layer: CompressedLayer, layout: str | None = None,
                 packed: tuple[str, int, dict] | None = None, put=None):
        layout, bits, bufs = packed or kernel_pack(layer, layout or preferred_layout(layer))
        self.lib, self.layout, self.n, self.k, self.bits = lib, layout, layer.rows, layer.cols, bits
        if layout == "sparse":  # the GPU kernels, like the CPU ones, would read a missing code as 0
            check_sparse_buffers(bufs["mask"], bufs["kept"], self.k)
        host = {"sign": bufs.get("sign") if layout in ("sign", "sign_mask") else None,
                "mask": bufs.get("mask") if layout in ("sign_mask", "sparse") else None,
                "planes": bufs["kept"] if layout == "sparse" else bufs.get("planes"),
                "scale": layer.scale, "lam": layer.lam, "bias": layer.bias}
        put = put or lib.put
        self._keep = {r: put(np.asarray(a, np.float32) if r in ("scale", "lam", "bias") else np.ascontiguousarray(a))
                      for r, a in host.items() if a is not None and a.size}  # device memory lives with self
        d = WeightsDesc(layout=LAYOUT_IDS[layout], n=self.n, k=self.k, bits=bits,
                        kept_words=bufs["kept"].shape[2] if layout == "sparse" else 0)
        for role in self.ROLES:
            setattr(d, role, self._keep[role].ptr if role in self._keep else None)
        self.desc, self.pdesc = d, C.pointer(d)
        self.device_bytes = sum(b.nbytes for b in self._keep.values())
        self.entry = lib.so.spfq_cuda_matmul_sparse_i8 if layout == "sparse" else lib.so.spfq_cuda_matmul_i8

    def _check(self, x: np.ndarray, name: str) -> np.ndarray:
        if not isinstance(x, np.ndarray) or x.ndim != 2 or x.shape[1] != self.k:
            raise CudaError(f"{name} must be (M, {self.k}), got {getattr(x, 'shape', type(x).__name__)}")
        return x

    def matmul_i8_raw(self, xq: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
        """Exact int32 (acc_c, acc_s) of host int8 activations (M, K)."""
        xq = self._check(np.ascontiguousarray(xq, np.int8), "xq")
        m, lib = xq.shape[0], self.lib
        dx, dc, ds = lib.put(xq), lib.empty((m, self.n), np.int32), lib.empty((m, self.n), np.int32)
        fn = lib.so.spfq_cuda_matmul_sparse_i8_raw if self.layout == "sparse" else lib.so.spfq_cuda_matmul_i8_raw
        lib.ok(fn(self.pdesc, m, dx.ptr, dc.ptr, ds.ptr, None), f"matmul_i8_raw ({self.layout})")
        return lib.get(dc, (m, self.n), np.int32), lib.get(ds, (m, self.n), np.int32)

    def matmul_i8_device(self, m: int, xq: int, xs: int, y: int, stream: int | None = None) -> None:
        """y = the CPU epilogue of int8 activations already on the device: device pointers (ints);
        asynchronous on `stream` (a cudaStream_t as an int, None = the default stream)."""
        self.lib.ok(self.entry(self.pdesc, m, xq, xs, y, stream), f"matmul_i8 ({self.layout})")

    def forward_f32(self, x: np.ndarray) -> np.ndarray:
        """Host float rows (M, K) -> y (M, N): upload, quantise on the GPU, GEMM, copy back."""
        x = self._check(np.ascontiguousarray(x, np.float32), "x")
        m, lib = x.shape[0], self.lib
        if m == 0:
            return np.zeros((0, self.n), np.float32)
        dx, dxq, dxs, dy = lib.put(x), lib.empty((m, self.k), np.int8), lib.empty((m,), np.float32), \
            lib.empty((m, self.n), np.float32)
        lib.ok(lib.so.spfq_cuda_quantize_i8(m, self.k, dx.ptr, dxq.ptr, dxs.ptr, None), "quantize_i8")
        self.matmul_i8_device(m, dxq.ptr, dxs.ptr, dy.ptr)
        return lib.get(dy, (m, self.n), np.float32)


def group_slice(layer: CompressedLayer, j: int) -> CompressedLayer:
    """Scale group j of a layer with group-wise scales (its columns, that group's scale / lam as
    the per-row ones, no bias) as a per-row-scale layer of its own."""
    G = layer.group_size
    c0, c1 = j * G, min((j + 1) * G, layer.cols)
    col = (lambda a: None if a is None else np.ascontiguousarray(a[:, j]))
    return CompressedLayer(f"{layer.name}[{c0}:{c1}]", "linear", (layer.rows, c1 - c0), layer.alphabet, layer.bits,
                           np.ascontiguousarray(layer.codes[:, c0:c1]), col(layer.scale), lam=col(layer.lam),
                           meta=layer.meta)


class CudaGroupedWeights:
    """A layer with group-wise scales (--group-size) on the GPU, in the float order of
    spfq_kernels.h (spfq_grouped_*): the rows quantised once over all K on the device, then per
    scale group the per-row-scale kernel on that group's columns (no bias), the float outputs
    summed in ascending group order, then the bias: bit for bit the CPU grouped kernels."""

    def __init__(self, lib: CudaLibrary, layer: CompressedLayer):
        self.lib, self.n, self.k, self.group = lib, layer.rows, layer.cols, layer.group_size
        self.parts = [CudaPackedWeights(lib, group_slice(layer, j)) for j in range(layer.ngroups)]
        self.bias = None if layer.bias is None else np.asarray(layer.bias, np.float32)
        self.device_bytes = sum(p.device_bytes for p in self.parts)

    def forward_f32(self, x: np.ndarray) -> np.ndarray:
        if not isinstance(x, np.ndarray) or x.ndim != 2 or x.shape[1] != self.k:
            raise CudaError(f"x must be (M, {self.k}), got {getattr(x, 'shape', type(x).__name__)}")
        x = np.ascontiguousarray(x, np.float32)
        m, lib = x.shape[0], self.lib
        if m == 0:
            return np.zeros((0, self.n), np.float32)
        dx, dxq, dxs = lib.put(x), lib.empty((m, self.k), np.int8), lib.empty((m,), np.float32)
        lib.ok(lib.so.spfq_cuda_quantize_i8(m, self.k, dx.ptr, dxq.ptr, dxs.ptr, None), "quantize_i8")
        xq = lib.get(dxq, (m, self.k), np.int8)
        s = None
        for j, part in enumerate(self.parts):
            dq, dy = lib.put(np.ascontiguousarray(xq[:, j * self.group:j * self.group + part.k])), \
                lib.empty((m, self.n), np.float32)
            part.matmul_i8_device(m, dq.ptr, dxs.ptr, dy.ptr)
            t = lib.get(dy, (m, self.n), np.float32)
            s = t if s is None else s + t
        return s + (self.bias if self.bias is not None else np.float32(0.0))


class CudaLayer(nn.Module):
    """A compressed Linear / Conv layer whose GEMMs run on the GPU (convs: host im2col per group,
    as the CPU path). Keeps its last input and output when `record` is set (validate's per-layer
    check)."""

    def __init__(self, lib: CudaLibrary, layer: CompressedLayer):
        super().__init__()
        self.layer = layer
        self.groups = int(layer.conv["groups"]) if layer.conv else 1
        n = layer.rows // self.groups
        kind = CudaGroupedWeights if layer.group_size else CudaPackedWeights
        self.parts = [kind(lib, rows_slice(layer, g * n, (g + 1) * n)) for g in range(self.groups)]
        self.record, self.last = False, None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        from .compress.capture import patch_rows, rows_to_output

        layer = self.layer
        in_ch = layer.weight_shape[1] * self.groups if layer.conv else layer.weight_shape[1]
        channel_dim = -1 if layer.kind == "linear" else 1
        if x.dim() < 2 or x.shape[channel_dim] != in_ch:
            raise CudaError(f"layer {layer.name} expects {in_ch} input features/channels, got shape {tuple(x.shape)}")
        rows = patch_rows(x.detach().float().cpu(), layer.kind, layer.conv)  # (g, m, d)
        ys = [w.forward_f32(rows[g].numpy()) for g, w in enumerate(self.parts)]
        y = rows_to_output(torch.from_numpy(np.concatenate(ys, axis=1)), x, layer.kind, layer.conv)
        if self.record:
            self.last = (x.detach().float().numpy().copy(), y.detach().numpy().copy())
        return y


def cuda_model(model: nn.Module, cm: CompressedModel, lib: CudaLibrary) -> nn.Module:
    """A copy of the reference `model` with every compressed layer a CudaLayer."""
    from .reference import replace_module

    model = copy.deepcopy(model)
    for name, layer in cm.layers.items():
        replace_module(model, name, CudaLayer(lib, layer))
    return model.eval()
