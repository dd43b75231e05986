"""CUDA kernels (kernels/cuda, GitHub issue 7 part 1) through their plain C ABI (ctypes).

(a) always: nvcc compiles kernels/cuda/*.cu into a shared library for sm_80 and sm_90 and the
    ABI symbols are exported (fails, naming the problem, when nvcc is missing);
(b) on a machine with a CUDA GPU: exact parity of the int32 sums against a numpy int64
    reference for every layout, y against the CPU kernels, bgemm and the int8 quantiser
    bit-exact with the CPU ones. Skipped without a GPU / driver."""

from __future__ import annotations

import ctypes as C
import os
import shutil
import subprocess
import time
from pathlib import Path

import numpy as np
import pytest

from spfq_deploy import kernels as K
from spfq_deploy.compressed import CompressedLayer
from spfq_deploy.kernels import LAYOUT_IDS, kernel_pack
from spfq_deploy.pack.layouts import default_layout

ROOT = Path(__file__).resolve().parents[1]
CUDA_DIR = ROOT / "kernels" / "cuda"
GENCODE = ["-gencode", "arch=compute_80,code=sm_80", "-gencode", "arch=compute_90,code=sm_90"]
SYMBOLS = ["spfq_cuda_abi_version", "spfq_cuda_device_count", "spfq_cuda_last_error", "spfq_cuda_set_device",
           "spfq_cuda_alloc", "spfq_cuda_free", "spfq_cuda_copy_h2d", "spfq_cuda_copy_d2h", "spfq_cuda_memset",
           "spfq_cuda_synchronize", "spfq_cuda_bgemm", "spfq_cuda_matmul_i8_raw", "spfq_cuda_matmul_i8",
           "spfq_cuda_matmul_sparse_i8_raw", "spfq_cuda_matmul_sparse_i8", "spfq_cuda_quantize_i8"]
NO_GPU = "no CUDA GPU on this machine: GPU parity unverified"


def find_nvcc() -> str | None:
    for cand in (os.environ.get("NVCC"), shutil.which("nvcc"), "/usr/local/bin/nvcc", "/usr/local/cuda/bin/nvcc"):
        if cand and os.path.isfile(cand) and os.access(cand, os.X_OK):
            return cand
    return None


@pytest.fixture(scope="module")
def cuda_so(tmp_path_factory) -> Path:
    nvcc = find_nvcc()
    if nvcc is None:
        pytest.fail("nvcc not found (PATH, $NVCC, /usr/local/bin, /usr/local/cuda/bin): the CUDA kernels "
                    "cannot be compile-checked; install the CUDA toolkit (CI has nvcc)")
    out = tmp_path_factory.mktemp("cuda") / "libspfq_cuda.so"
    sources = sorted(str(p) for p in CUDA_DIR.glob("*.cu"))
    assert sources, f"no .cu files under {CUDA_DIR}"
    cmd = [nvcc, "-shared", "-Xcompiler", "-fPIC", "-O3", *GENCODE, "--threads", "0", *sources, "-o", str(out)]
    t0 = time.monotonic()
    res = subprocess.run(cmd, capture_output=True, text=True, timeout=600)
    if res.returncode != 0:
        pytest.fail(f"nvcc failed ({' '.join(cmd)}):\n{res.stdout}\n{res.stderr}")
    print(f"nvcc: {time.monotonic() - t0:.1f} s")
    return out


def test_nvcc_builds_library_with_abi_symbols(cuda_so):
    nm = shutil.which("nm")
    assert nm, "nm (binutils) is needed to list the exported symbols"
    res = subprocess.run([nm, "-D", "--defined-only", str(cuda_so)], capture_output=True, text=True, check=True)
    exported = {line.split()[-1] for line in res.stdout.splitlines() if line.strip()}
    missing = [s for s in SYMBOLS if s not in exported]
    assert not missing, f"not exported: {missing}"
    internal = [s for s in exported if s in ("spfq_cuda_fail", "spfq_cuda_check", "spfq_cuda_i8_setup")]
    assert not internal, f"internal helpers leak: {internal}"
    # sm_80 and sm_90 SASS are both embedded
    cuobjdump = shutil.which("cuobjdump") or (str(Path(find_nvcc()).parent / "cuobjdump"))
    if os.path.exists(cuobjdump):
        res = subprocess.run([cuobjdump, "--list-elf", str(cuda_so)], capture_output=True, text=True)
        if res.returncode == 0:
            assert "sm_80" in res.stdout and "sm_90" in res.stdout, res.stdout


# ------------------------------------------------------------------ GPU parity (needs a GPU)

class Desc(C.Structure):  # spfq_weights_desc, with device pointers
    _fields_ = [("layout", C.c_int32), ("n", C.c_int32), ("k", C.c_int32), ("bits", C.c_int32),
                ("kept_words", C.c_int32), ("sign", C.c_void_p), ("mask", C.c_void_p), ("planes", C.c_void_p),
                ("scale", C.c_void_p), ("lam", C.c_void_p), ("bias", C.c_void_p)]


class Cuda:
    def __init__(self, path: Path):
        self.lib = lib = C.CDLL(str(path))
        lib.spfq_cuda_last_error.restype = C.c_char_p
        lib.spfq_cuda_device_count.restype = C.c_int32
        lib.spfq_cuda_alloc.argtypes = [C.POINTER(C.c_void_p), C.c_size_t]
        lib.spfq_cuda_free.argtypes = [C.c_void_p]
        lib.spfq_cuda_copy_h2d.argtypes = [C.c_void_p, C.c_void_p, C.c_size_t]
        lib.spfq_cuda_copy_d2h.argtypes = [C.c_void_p, C.c_void_p, C.c_size_t]
        lib.spfq_cuda_synchronize.argtypes = [C.c_void_p]
        lib.spfq_cuda_bgemm.argtypes = [C.c_int32] * 3 + [C.c_void_p] * 9
        for f in ("spfq_cuda_matmul_i8_raw", "spfq_cuda_matmul_sparse_i8_raw",
                  "spfq_cuda_matmul_i8", "spfq_cuda_matmul_sparse_i8"):
            getattr(lib, f).argtypes = [C.POINTER(Desc), C.c_int32] + [C.c_void_p] * 4
        lib.spfq_cuda_quantize_i8.argtypes = [C.c_int32, C.c_int32] + [C.c_void_p] * 4
        self.live: list[int] = []

    def ok(self, rc, what):
        assert rc == 0, f"{what}: status {rc}: {self.lib.spfq_cuda_last_error().decode()}"

    def put(self, a) -> int | None:
        if a is None:
            return None
        a = np.ascontiguousarray(a)
        p = C.c_void_p()
        self.ok(self.lib.spfq_cuda_alloc(C.byref(p), max(a.nbytes, 1)), "alloc")
        self.live.append(p.value)
        self.ok(self.lib.spfq_cuda_copy_h2d(p, a.ctypes.data, a.nbytes), "h2d")
        return p.value

    def empty(self, shape, dtype) -> tuple[int, np.ndarray]:
        host = np.zeros(shape, dtype)
        return self.put(host), host

    def get(self, dev, host):
        self.ok(self.lib.spfq_cuda_synchronize(None), "synchronize")
        self.ok(self.lib.spfq_cuda_copy_d2h(host.ctypes.data, dev, host.nbytes), "d2h")
        return host

    def free_all(self):
        for p in self.live:
            self.lib.spfq_cuda_free(p)
        self.live.clear()


@pytest.fixture(scope="module")
def cuda(cuda_so):
    try:
        cu = Cuda(cuda_so)
    except OSError as exc:  # libcudart / libcuda missing
        pytest.skip(f"{NO_GPU} ({exc})")
    if cu.lib.spfq_cuda_device_count() <= 0:
        pytest.skip(f"{NO_GPU} ({cu.lib.spfq_cuda_last_error().decode() or 'no device'})")
    yield cu
    cu.free_all()


def make_layer(alphabet, bits, n, k, pruned=False, sparsity=0.5, lam=True, seed=0):
    rng = np.random.default_rng(seed)
    kmax = 1 if alphabet in ("binary", "ternary") else 2 ** (bits - 1) - 1
    if alphabet == "binary" and not pruned:
        codes = rng.choice(np.array([-1, 1], np.int8), size=(n, k))
    else:
        codes = rng.integers(-kmax, kmax + 1, size=(n, k)).astype(np.int8)
        if pruned:
            codes[codes == 0] = 1
            codes[rng.random((n, k)) < sparsity] = 0
            codes[:, : min(k, 130)] = 0  # whole zero 64-blocks (skipped by the sparse kernel)
    scale = (rng.random(n) * 0.1 + 0.01).astype(np.float32)
    lam_v = (scale * 1.7).astype(np.float32) if (lam and pruned and kmax > 1) else None
    bias = rng.standard_normal(n).astype(np.float32)
    return CompressedLayer("t", "linear", (n, k), alphabet, bits, codes, scale, lam_v, bias,
                           meta={"sparsity_target": sparsity if pruned else 0.0})


def upload(cu: Cuda, layer, layout: str) -> Desc:
    _, bits, bufs = kernel_pack(layer, layout)
    d = Desc(layout=LAYOUT_IDS[layout], n=layer.rows, k=layer.cols, bits=bits, kept_words=0)
    d.sign = cu.put(bufs.get("sign")) if layout in ("sign", "sign_mask") else None
    d.mask = cu.put(bufs["mask"]) if layout in ("sign_mask", "sparse") else None
    if layout == "planes":
        d.planes = cu.put(bufs["planes"])
    if layout == "sparse":
        d.kept_words = bufs["kept"].shape[2]
        d.planes = cu.put(bufs["kept"]) if bufs["kept"].size else None
    d.scale = cu.put(np.asarray(layer.scale, np.float32))
    d.lam = cu.put(None if layer.lam is None else np.asarray(layer.lam, np.float32))
    d.bias = cu.put(np.asarray(layer.bias, np.float32))
    return d


CASES = [("binary", 1, False), ("ternary", 2, False), ("binary", 1, True)] + \
        [("int", b, False) for b in range(2, 9)] + [("int", b, True) for b in (2, 4, 8)]
SHAPES = [(1, 1, 1), (1, 70, 257), (3, 65, 64), (9, 33, 1000), (17, 5, 130)]


@pytest.mark.parametrize("alphabet,bits,pruned", CASES)
@pytest.mark.parametrize("m,n,k", SHAPES)
def test_cuda_i8_parity(cuda, alphabet, bits, pruned, m, n, k):
    layer = make_layer(alphabet, bits, n, k, pruned=pruned, seed=m * 1000 + n + k)
    layouts = [default_layout(layer)] + (["planes"] if alphabet == "int" and pruned else [])
    rng = np.random.default_rng(n + k)
    x = rng.standard_normal((m, k)).astype(np.float32)
    xq, xs = K.quantize_i8(x)
    xq[0, : min(k, 3)] = [-127, 127, -128][: min(k, 3)]  # extremes (-128 is outside the quantiser)
    c = layer.codes.astype(np.int64)
    want_c = (xq.astype(np.int64) @ c.T).astype(np.int32)  # int32 wrap, as the ABI stores
    want_s = (xq.astype(np.int64) @ np.sign(c).T).astype(np.int32)
    dxq, dxs = cuda.put(xq), cuda.put(xs)
    for layout in layouts:
        d = upload(cuda, layer, layout)
        sparse = layout == "sparse"
        raw = cuda.lib.spfq_cuda_matmul_sparse_i8_raw if sparse else cuda.lib.spfq_cuda_matmul_i8_raw
        full = cuda.lib.spfq_cuda_matmul_sparse_i8 if sparse else cuda.lib.spfq_cuda_matmul_i8
        dc, hc = cuda.empty((m, n), np.int32)
        ds, hs = cuda.empty((m, n), np.int32)
        cuda.ok(raw(C.byref(d), m, dxq, dc, ds, None), f"{layout} raw")
        got_c, got_s = cuda.get(dc, hc).copy(), cuda.get(ds, hs).copy()
        assert np.array_equal(got_s, want_s), f"{layout}: acc_s differs"
        assert np.array_equal(got_c, want_c), f"{layout}: acc_c differs"
        dy, hy = cuda.empty((m, n), np.float32)
        cuda.ok(full(C.byref(d), m, dxq, dxs, dy, None), f"{layout} y")
        y = cuda.get(dy, hy)
        cpu = K.PackedWeights.from_layer(layer, layout).matmul_i8(xq, xs)
        np.testing.assert_allclose(y, cpu, rtol=1e-6, atol=1e-6 * (np.abs(cpu).max() + 1))


@pytest.mark.parametrize("m,n,k", [(1, 1, 1), (3, 64, 64), (4, 65, 63), (33, 130, 1000)])
def test_cuda_bgemm_parity(cuda, m, n, k):
    layer = make_layer("binary", 1, n, k, seed=n + k)
    _, _, bufs = kernel_pack(layer, "sign")
    x = np.random.default_rng(m + k).standard_normal((m, k)).astype(np.float32)
    xbits, xs = K.binarize(x)
    xsign = np.where(x < 0, -1, 1).astype(np.int64)
    want = (xsign @ layer.codes.astype(np.int64).T).astype(np.int32)
    dw, dx, dxs = cuda.put(bufs["sign"]), cuda.put(xbits), cuda.put(xs)
    dscale, dbias = cuda.put(np.asarray(layer.scale, np.float32)), cuda.put(layer.bias)
    ddot, hdot = cuda.empty((m, n), np.int32)
    dy, hy = cuda.empty((m, n), np.float32)
    dyb, hyb = cuda.empty((m, (n + 63) // 64), np.uint64)
    cuda.ok(cuda.lib.spfq_cuda_bgemm(m, n, k, dw, dx, dxs, dscale, dbias, ddot, dy, dyb, None), "bgemm")
    assert np.array_equal(cuda.get(ddot, hdot), want)
    y = cuda.get(dy, hy)
    want_y = xs[:, None] * layer.scale[None, :] * want.astype(np.float32) + layer.bias
    np.testing.assert_allclose(y, want_y, rtol=1e-6, atol=1e-6)
    bits = np.unpackbits(cuda.get(dyb, hyb).view(np.uint8), axis=1, bitorder="little")[:, :n]
    assert np.array_equal(bits.astype(bool), y < 0)


@pytest.mark.parametrize("m,k", [(1, 1), (3, 384), (7, 1000), (2, 5)])
def test_cuda_quantize_i8_bit_exact(cuda, m, k):
    rng = np.random.default_rng(m * k)
    x = (rng.standard_normal((m, k)) * 3).astype(np.float32)
    x[0, 0] = np.float32(0.5) * (np.abs(x[0]).max() / np.float32(127))  # half-way values
    if m > 2:
        x[2] = 0.0  # all-zero row: xscale 0, xq 0
    want_q, want_s = K.quantize_i8(x)
    dx = cuda.put(x)
    dq, hq = cuda.empty((m, k), np.int8)
    ds, hs = cuda.empty((m,), np.float32)
    cuda.ok(cuda.lib.spfq_cuda_quantize_i8(m, k, dx, dq, ds, None), "quantize")
    assert np.array_equal(cuda.get(ds, hs), want_s)
    assert np.array_equal(cuda.get(dq, hq), want_q)


def test_cuda_bad_arguments(cuda):
    lib = cuda.lib
    assert lib.spfq_cuda_matmul_i8_raw(None, 1, None, None, None, None) == 1
    d = Desc(layout=9, n=1, k=1, bits=1)
    dummy = cuda.put(np.zeros(8, np.int8))
    assert lib.spfq_cuda_matmul_i8_raw(C.byref(d), 1, dummy, dummy, dummy, None) == 1
    assert b"layout" in lib.spfq_cuda_last_error()
    d = Desc(layout=LAYOUT_IDS["sparse"], n=1, k=1, bits=2, mask=dummy, planes=dummy, kept_words=1)
    assert lib.spfq_cuda_matmul_i8_raw(C.byref(d), 1, dummy, dummy, dummy, None) == 3
    assert lib.spfq_cuda_bgemm(1, 0, 1, dummy, dummy, None, None, None, dummy, None, None, None) == 1
    assert lib.spfq_cuda_quantize_i8(-1, 1, dummy, dummy, dummy, None) == 1
