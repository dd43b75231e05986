"""Gram-form path following with its column loop in C (kernels/src/path_following.c).

Same blocking and the same double arithmetic as path_following.gram_path_following (the
reference, which stays in Python and is what the tests compare with): the block corrections
are the same torch matmuls, and the C loop repeats alphabet.quantize / Alphabet.values
operation for operation, so codes and values are bit-identical. Rows run on the kernel
library's worker pool (torch's thread count).
"""

from __future__ import annotations

import ctypes as C

import torch

from .. import kernels
from .alphabet import Alphabet
from .path_following import _inv_diag

IDENTITY, NEAREST, STOCHASTIC = 0, 1, 2  # enum spfq_pf_mode


class _Desc(C.Structure):
    _fields_ = [("cands", C.c_int32), ("groups", C.c_int32), ("rows", C.c_int32), ("d", C.c_int32),
                ("mode", C.c_int32), ("levels", C.c_int32), ("has_zero", C.c_int32),
                ("A", C.c_void_p), ("H", C.c_void_p), ("inv", C.c_void_p), ("lam", C.c_void_p),
                ("delta", C.c_void_p), ("U", C.c_void_p), ("codes", C.c_void_p), ("Q", C.c_void_p),
                ("qhq", C.c_void_p), ("per_column", C.c_int32)]


_fn = None


def _kernel():
    global _fn
    if _fn is None:
        fn = kernels.lib().spfq_path_following_block
        fn.argtypes = [C.POINTER(_Desc), C.c_int32, C.c_int32, C.c_void_p, C.c_int32]
        fn.restype = C.c_int
        _fn = fn
    return _fn


def _ptr(t: torch.Tensor | None, dtype) -> int | None:
    if t is None:
        return None
    if t.dtype != dtype or not t.is_contiguous():
        raise kernels.KernelError(f"path following: expected a contiguous {dtype} tensor, got {t.dtype}")
    return t.data_ptr()


def prepare(W, G) -> torch.Tensor:
    """A[..., t] = sum_{j<=t} G_tj w_j: the candidate-independent start of path following (as
    in the reference), one GEMM that a caller scoring many candidates makes once."""
    return (W @ torch.tril(G).transpose(-1, -2)).contiguous()


def path_following(W, G, H, alph: Alphabet | None, U=None, block: int = 128, out_shape=None, A=None,
                   per_column: bool = False):
    """(codes, Q, qHq) of gram_path_following with T = alphabet.quantize on `alph` (stochastic
    when U is given), or the identity (alph None: codes None). W (g, n, d); G, H (g, d, d);
    out_shape may add leading candidate axes, which alph's lam / delta (..., g, n) then carry.
    qHq (..., g, n) is q'Hq per row, summed in the loop (squared_output_error takes it).
    A: prepare(W, G) when the caller has it. per_column: alph's lam / delta are (..., g, n, d),
    one per column (group-wise scales, Alphabet.columns), not one per row."""
    g, n, d = W.shape
    A = prepare(W, G) if A is None else A
    inv = _inv_diag(H)
    Q = torch.zeros(out_shape or torch.broadcast_shapes(W.shape, inv[..., None, :].shape), dtype=W.dtype)
    inv = inv.contiguous()
    Hc = H.contiguous()
    codes = lam = delta = None
    mode, levels, has_zero, per_column = IDENTITY, 0, 0, int(per_column)
    if alph is not None:
        codes = torch.zeros(Q.shape, dtype=torch.int8)
        lam_shape = Q.shape if per_column else Q.shape[:-1]
        lam = alph.lam.to(W.dtype).expand(lam_shape).contiguous()
        delta = alph.delta.to(W.dtype).expand(lam_shape).contiguous()
        mode, levels, has_zero = (STOCHASTIC if U is not None else NEAREST), alph.K, int(alph.has_zero)
        U = None if U is None else U.to(W.dtype).expand(W.shape).contiguous()
    qhq = torch.zeros(Q.shape[:-1], dtype=W.dtype)
    desc = _Desc(Q.numel() // (g * n * d), g, n, d, mode, levels, has_zero,
                 _ptr(A, torch.float64), _ptr(Hc, torch.float64), _ptr(inv, torch.float64),
                 _ptr(lam, torch.float64), _ptr(delta, torch.float64), _ptr(U, torch.float64),
                 _ptr(codes, torch.int8), _ptr(Q, torch.float64), _ptr(qhq, torch.float64), per_column)
    fn, threads = _kernel(), torch.get_num_threads()
    for b0 in range(0, d, block):
        b1 = min(b0 + block, d)
        corr = (Q[..., :b0] @ H[..., b0:b1, :b0].transpose(-1, -2)).expand(Q[..., b0:b1].shape).contiguous()
        status = fn(C.byref(desc), b0, b1, corr.data_ptr(), threads)
        if status:
            raise kernels.KernelError(f"path following: status {status}")
    return codes, Q, qhq
