"""CUDA kernels (kernels/cuda) through their plain C ABI (spfq_deploy.cuda_runtime, ctypes).

(a) always: nvcc compiles kernels/cuda/*.cu into the GPU library for every gencode of
    targets/cuda.toml (sm_80, sm_90; the SASS of each is checked) and the ABI symbols are
    exported; fails, naming the problem, when nvcc is missing;
(b) parity, run twice: against the host-emulation build (-DSPFQ_CUDA_EMULATE: the kernels'
    per-lane decode / dp4a / sparse walk / epilogue / quantiser code run on the CPU, always), and
    against the GPU build on a machine with a CUDA GPU (skipped elsewhere, saying so). Integer
    sums exact against a numpy int64 reference for every layout and bit width, y against the CPU
    kernels, bgemm and the int8 quantiser bit-exact with the CPU ones; the dense GEMV kernel
    (m <= 4) at K around its 128-column chunk edges, with unaligned activations and weights."""

from __future__ import annotations

import ctypes as C
import mmap
import shutil
import subprocess
from pathlib import Path

import numpy as np
import pytest

from spfq_deploy import kernels as K
from spfq_deploy.compressed import CompressedLayer
from spfq_deploy.cuda_runtime import CudaLibrary, CudaPackedWeights
from spfq_deploy.export.cuda import library as cuda_library
from spfq_deploy.kernels import LAYOUT_IDS, WeightsDesc, kernel_pack
from spfq_deploy.pack.layouts import default_layout
from spfq_deploy.targets import get_target

SYMBOLS = ["spfq_cuda_abi_version", "spfq_cuda_library_info", "spfq_cuda_device_count", "spfq_cuda_device_name",
           "spfq_cuda_last_error", "spfq_cuda_set_device", "spfq_cuda_alloc", "spfq_cuda_free",
           "spfq_cuda_copy_h2d", "spfq_cuda_copy_d2h", "spfq_cuda_memset", "spfq_cuda_synchronize",
           "spfq_cuda_bgemm", "spfq_cuda_matmul_i8_raw", "spfq_cuda_matmul_i8", "spfq_cuda_matmul_sparse_i8_raw",
           "spfq_cuda_matmul_sparse_i8", "spfq_cuda_quantize_i8"]


def _build(emulate: bool) -> Path:
    try:
        return cuda_library.build(get_target("cuda"), emulate=emulate)
    except Exception as exc:  # nvcc missing or failing is a failure here, never a skip
        pytest.fail(f"building kernels/cuda ({'emulation' if emulate else 'GPU'}) failed: {exc}")


@pytest.fixture(scope="module")
def cuda_so() -> Path:
    return _build(False)


def _exported(path: Path) -> set[str]:
    nm = shutil.which("nm")
    assert nm, "nm (binutils) is needed to list the exported symbols"
    res = subprocess.run([nm, "-D", "--defined-only", str(path)], capture_output=True, text=True, check=True)
    return {line.split()[-1] for line in res.stdout.splitlines() if line.strip()}


@pytest.mark.parametrize("emulate", [False, True], ids=["gpu-build", "emulation-build"])
def test_nvcc_builds_library_with_abi_symbols(emulate):
    path = _build(emulate)
    exported = _exported(path)
    missing = [s for s in SYMBOLS if s not in exported]
    assert not missing, f"not exported: {missing}"
    internal = [s for s in exported if s in ("spfq_cuda_fail", "spfq_cuda_check", "spfq_cuda_i8_setup")]
    assert not internal, f"internal helpers leak: {internal}"
    lib = CudaLibrary(path)
    assert lib.emulation == emulate, lib.info
    if emulate:
        return
    assert "sm_80 sm_90" in lib.info, lib.info
    # the SASS of every gencode in targets/cuda.toml is embedded (where the toolkit has cuobjdump;
    # this machine's nvcc package ships without it)
    cuobjdump = shutil.which("cuobjdump") or str(Path(cuda_library.find_nvcc(get_target("cuda"))).parent / "cuobjdump")
    if Path(cuobjdump).exists():
        res = subprocess.run([cuobjdump, "--list-elf", str(path)], capture_output=True, text=True)
        assert res.returncode == 0, res.stderr
        for arch in cuda_library.arch_list(get_target("cuda")):
            assert arch in res.stdout, (arch, res.stdout)


# ------------------------------------------------------------------ parity (emulation / GPU)

@pytest.fixture(scope="module", params=["emulation", "gpu"])
def cuda(request) -> CudaLibrary:
    """The library under test: the host emulation always, the GPU build where a GPU is."""
    lib = CudaLibrary(_build(request.param == "emulation"))
    if request.param == "gpu":
        why = lib.unavailable()
        if why:
            pytest.skip(f"{why}: GPU parity unverified")
    return lib


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


def upload(cu: CudaLibrary, layer, layout: str) -> CudaPackedWeights:
    return CudaPackedWeights(cu, layer, layout)


def matmul_i8_y(cu: CudaLibrary, w: CudaPackedWeights, m: int, xq_ptr: int, xs_ptr: int, y_ptr: int) -> None:
    """spfq_cuda_matmul_i8 / _sparse_i8 on device pointers (ints), straight through the ABI."""
    fn = cu.so.spfq_cuda_matmul_sparse_i8 if w.layout == "sparse" else cu.so.spfq_cuda_matmul_i8
    cu.ok(fn(C.byref(w.desc), m, xq_ptr, xs_ptr, y_ptr, None), f"matmul_i8 ({w.layout})")


def put_at(cu: CudaLibrary, a: np.ndarray, offset: int):
    """A device copy of `a` starting `offset` bytes into a fresh (256-byte aligned) allocation
    whose other bytes are 0x5A, so that reading past the end counts (the buffer, to keep alive;
    the pointer)."""
    a = np.ascontiguousarray(a)
    buf = cu.empty((a.nbytes + offset + 16,), np.uint8)
    cu.ok(cu.so.spfq_cuda_memset(buf.ptr, 0x5A, buf.nbytes), "memset")
    cu.ok(cu.so.spfq_cuda_copy_h2d(buf.ptr + offset, a.ctypes.data, a.nbytes), "copy to device")
    return buf, buf.ptr + offset


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
        w = upload(cuda, layer, layout)
        got_c, got_s = w.matmul_i8_raw(xq)
        assert np.array_equal(got_s, want_s), f"{layout}: acc_s differs"
        assert np.array_equal(got_c, want_c), f"{layout}: acc_c differs"
        dy = cuda.empty((m, n), np.float32)
        matmul_i8_y(cuda, w, m, dxq.ptr, dxs.ptr, dy.ptr)
        y = cuda.get(dy, (m, n), np.float32)
        cpu = K.PackedWeights.from_layer(layer, layout).matmul_i8(xq, xs)
        np.testing.assert_allclose(y, cpu, rtol=1e-6, atol=1e-6 * (np.abs(cpu).max() + 1))
        # float rows in: the GPU quantiser + GEMM equal the CPU quantiser + GEMM
        cpu_f = K.PackedWeights.from_layer(layer, layout).matmul_i8(*K.quantize_i8(x))
        np.testing.assert_allclose(w.forward_f32(x), cpu_f, rtol=1e-6, atol=1e-6 * (np.abs(cpu_f).max() + 1))


# dense layouts on the GEMV kernel (m <= 4; m = 5 is the tiled kernel): (alphabet, bits, pruned, layout);
# pruned int layers carry lam and are forced onto PLANES
GEMV_CASES = [("binary", 1, False, "sign"), ("ternary", 2, False, "sign_mask"), ("binary", 1, True, "sign_mask")] + \
             [("int", b, False, "planes") for b in (2, 4, 8)] + [("int", b, True, "planes") for b in (2, 4, 8)]
# around the 64-column words and 128-column lane chunks; 4096 + 40: an odd W (every other row only
# 8-byte aligned, a half chunk at the end); 11008: 3 passes, the last with idle lanes
GEMV_K = [1, 63, 64, 127, 128, 129, 4096 + 40, 11008]
# (xq byte offset, weights byte offset): 128-bit activation loads only at 0 (and K % 16 == 0 when
# m > 1), 32-bit at 4 / 8, bytes at 1..3; weights 8 bytes off 16-byte alignment take 64-bit loads.
# "guard" (emulation only): xq and every weight array end where a PROT_NONE page begins, so a read
# of a column >= K or a word >= W of the last row segfaults. (The emulation's load twins abort on
# an address the GPU load could not take.)
GEMV_OFFSETS = [(0, 0), (1, 0), (2, 0), (3, 0), (8, 0), (0, 8), ("guard", "guard")]


def guarded(cu: CudaLibrary, a: np.ndarray):
    """Emulation only (its "device" memory is host memory): a copy of `a` ending exactly at a
    PROT_NONE page. Returns (the mapping, to keep alive; the pointer)."""
    assert cu.emulation
    a = np.ascontiguousarray(a)
    page = mmap.PAGESIZE
    size = (a.nbytes + page - 1) // page * page + page
    mm = mmap.mmap(-1, size)
    guard = C.addressof(C.c_char.from_buffer(mm)) + size - page
    libc = C.CDLL(None, use_errno=True)
    libc.mprotect.argtypes = [C.c_void_p, C.c_size_t, C.c_int]
    assert libc.mprotect(guard, page, 0) == 0, C.get_errno()  # PROT_NONE
    C.memmove(guard - a.nbytes, a.ctypes.data, a.nbytes)
    return mm, guard - a.nbytes


def place(cu: CudaLibrary, a: np.ndarray, where):
    """(keep-alive object, device pointer) of a copy of `a` at byte offset `where`, or guarded."""
    return guarded(cu, a) if where == "guard" else put_at(cu, a, where)


def placed_desc(cu: CudaLibrary, layer, w: CudaPackedWeights, where):
    """A copy of w.desc whose packed words are copies placed by `place` (the copies, to keep
    alive; the desc)."""
    _, _, bufs = kernel_pack(layer, w.layout)
    d = WeightsDesc()
    C.memmove(C.byref(d), C.byref(w.desc), C.sizeof(WeightsDesc))
    keep = []
    for field in ("sign", "mask", "planes"):
        if getattr(d, field):
            buf, ptr = place(cu, bufs[field], where)
            keep.append(buf)
            setattr(d, field, ptr)
    return keep, d


@pytest.mark.parametrize("k", GEMV_K)
@pytest.mark.parametrize("alphabet,bits,pruned,layout", GEMV_CASES)
def test_cuda_gemv_parity(cuda, alphabet, bits, pruned, layout, k):
    """m = 1..4 (GEMV kernel) and 5 (tiled): exact int32 sums vs numpy int64 and y vs the CPU
    kernels, at every xq / weight alignment of GEMV_OFFSETS; N = 1, 3 (R = 2 / 4 rows per warp:
    partial last warps) and 4097 (many blocks) at K = 129."""
    so = cuda.so
    for n in (1, 3) + ((4097,) if k == 129 else ()):
        layer = make_layer(alphabet, bits, n, k, pruned=pruned, seed=7 * n + k + bits)
        c = layer.codes.astype(np.int64)
        w = upload(cuda, layer, layout)
        cpu = K.PackedWeights.from_layer(layer, layout)
        two = layout == "planes"
        offsets = [o for o in GEMV_OFFSETS if cuda.emulation or o[0] != "guard"]
        if n == 4097:
            offsets = offsets[:2]
        for m in (1, 2, 3, 4, 5):
            rng = np.random.default_rng(m * 100003 + n * 31 + k)
            xq = rng.integers(-128, 128, size=(m, k), dtype=np.int8)  # the full int8 range
            xs = (rng.random(m) * 0.02 + 0.001).astype(np.float32)
            want_c = (xq.astype(np.int64) @ c.T).astype(np.int32)
            want_s = (xq.astype(np.int64) @ np.sign(c).T).astype(np.int32)
            want_y = cpu.matmul_i8(xq, xs)
            xs_buf, dxs = put_at(cuda, xs, 0)
            for x_off, w_off in offsets:
                where = f"{layout} b={bits} lam={layer.lam is not None} m={m} n={n} k={k} xq+{x_off} w+{w_off}"
                keep, d = placed_desc(cuda, layer, w, w_off) if w_off else ([], w.desc)
                xbuf, dxq = place(cuda, xq, x_off)
                dc, ds = cuda.empty((m, n), np.int32), cuda.empty((m, n), np.int32)
                cuda.ok(so.spfq_cuda_matmul_i8_raw(C.byref(d), m, dxq, dc.ptr, ds.ptr, None), where)
                assert np.array_equal(cuda.get(ds, (m, n), np.int32), want_s), f"{where}: acc_s differs"
                assert np.array_equal(cuda.get(dc, (m, n), np.int32), want_c if two else want_s), \
                    f"{where}: acc_c differs"
                if two:  # acc_c alone (the kernel skips the sign sums)
                    dc2 = cuda.empty((m, n), np.int32)
                    cuda.ok(so.spfq_cuda_matmul_i8_raw(C.byref(d), m, dxq, dc2.ptr, None, None), where)
                    assert np.array_equal(cuda.get(dc2, (m, n), np.int32), want_c), f"{where}: acc_c alone differs"
                dy = cuda.empty((m, n), np.float32)
                cuda.ok(so.spfq_cuda_matmul_i8(C.byref(d), m, dxq, dxs, dy.ptr, None), where)
                y = cuda.get(dy, (m, n), np.float32)
                np.testing.assert_allclose(y, want_y, rtol=1e-6, atol=1e-6 * (np.abs(want_y).max() + 1), err_msg=where)
                del keep, xbuf


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
    ddot, dy = cuda.empty((m, n), np.int32), cuda.empty((m, n), np.float32)
    dyb = cuda.put(np.full((m, (n + 63) // 64), 0xAAAAAAAAAAAAAAAA, np.uint64))  # old bits: set and cleared
    cuda.ok(cuda.so.spfq_cuda_bgemm(m, n, k, dw.ptr, dx.ptr, dxs.ptr, dscale.ptr, dbias.ptr, ddot.ptr, dy.ptr,
                                    dyb.ptr, None), "bgemm")
    assert np.array_equal(cuda.get(ddot, (m, n), np.int32), want)
    y = cuda.get(dy, (m, n), np.float32)
    want_y = xs[:, None] * layer.scale[None, :] * want.astype(np.float32) + layer.bias
    np.testing.assert_allclose(y, want_y, rtol=1e-6, atol=1e-6)
    cpu_dot, cpu_y, cpu_bits = K.PackedWeights.from_layer(layer, "sign").bgemm(xbits, xs, rebinarize=True)
    assert np.array_equal(cpu_dot, want)
    yb = cuda.get(dyb, (m, (n + 63) // 64), np.uint64)
    bits = np.unpackbits(yb.view(np.uint8), axis=1, bitorder="little")[:, :n]
    assert np.array_equal(bits.astype(bool), y < 0)
    if n % 64 == 0:
        assert np.array_equal(yb, cpu_bits)


@pytest.mark.parametrize("m,k", [(1, 1), (3, 384), (7, 1000), (2, 5)])
def test_cuda_quantize_i8_bit_exact(cuda, m, k):
    rng = np.random.default_rng(m * k)
    x = (rng.standard_normal((m, k)) * 3).astype(np.float32)
    x[0, 0] = np.float32(0.5) * (np.abs(x[0]).max() / np.float32(127))  # half-way values
    if m > 2:
        x[2] = 0.0  # all-zero row: xscale 0, xq 0
    want_q, want_s = K.quantize_i8(x)
    dx, dq, ds = cuda.put(x), cuda.empty((m, k), np.int8), cuda.empty((m,), np.float32)
    cuda.ok(cuda.so.spfq_cuda_quantize_i8(m, k, dx.ptr, dq.ptr, ds.ptr, None), "quantize")
    assert np.array_equal(cuda.get(ds, (m,), np.float32), want_s)
    assert np.array_equal(cuda.get(dq, (m, k), np.int8), want_q)


def test_cuda_bad_arguments(cuda):
    so = cuda.so
    buf = cuda.put(np.zeros(8, np.int8))
    dummy = buf.ptr
    assert so.spfq_cuda_matmul_i8_raw(None, 1, None, None, None, None) == 1
    d = WeightsDesc(layout=9, n=1, k=1, bits=1)
    assert so.spfq_cuda_matmul_i8_raw(C.byref(d), 1, dummy, dummy, dummy, None) == 1
    assert "layout" in cuda.last_error()
    d = WeightsDesc(layout=LAYOUT_IDS["sparse"], n=1, k=1, bits=2, mask=dummy, planes=dummy, kept_words=1)
    assert so.spfq_cuda_matmul_i8_raw(C.byref(d), 1, dummy, dummy, dummy, None) == 3
    assert so.spfq_cuda_bgemm(1, 0, 1, dummy, dummy, None, None, None, dummy, None, None, None) == 1
    assert so.spfq_cuda_quantize_i8(-1, 1, dummy, dummy, dummy, None) == 1
    with pytest.raises(Exception, match="must be"):
        upload(cuda, make_layer("binary", 1, 4, 64), "sign").forward_f32(np.zeros((2, 63), np.float32))
    assert cuda.device_count() >= 1 and cuda.device_name(0)


def test_upload_rejects_sparse_buffers_whose_mask_and_kept_codes_disagree(cuda):
    """Issue 12, defect 9 on the GPU path: a mask that disagrees with the kept codes would make the
    kernels compute with other weights; the upload refuses it, naming the row."""
    layer = make_layer("int", 4, 8, 200, pruned=True, sparsity=0.7)
    layout, bits, bufs = kernel_pack(layer, "sparse")
    # a row whose last kept code is not +1 (field 0): clearing its mask bit leaves a code behind
    row = next(r for r in range(layer.rows) if layer.codes[r][layer.codes[r] != 0][-1] != 1)
    col = int(np.flatnonzero(layer.codes[row])[-1])
    bad = dict(bufs, mask=bufs["mask"].copy())
    bad["mask"][row, col // 64] &= ~np.uint64(1 << (col % 64))
    with pytest.raises(K.KernelError, match=f"row {row}"):
        CudaPackedWeights(cuda, layer, packed=(layout, bits, bad))
    CudaPackedWeights(cuda, layer, packed=(layout, bits, bufs))  # the consistent buffers upload
