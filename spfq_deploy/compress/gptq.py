"""GPTQ/OPTQ (Frantar et al., arXiv 2210.17323) run as a Gram-form path following.

GPTQ takes the columns in order (act-order: by decreasing H_tt), rounds column t of the
updated weights, z_t, and spreads its error over the later columns through row t of U, the
upper Cholesky factor of the damped inverse Hessian: w_j -= (z_t - q_t) U_tj / U_tt, j > t.
Unrolled, that is
    z_t = (sum_{j<=t} K_tj w_j - sum_{j<t} K_tj q_j) / K_tt,   K = U^-T,  K^T K = H,
the recurrence of path_following.gram_path_following with K's lower triangle in place of G and
H. So native.path_following (the C column loop, lazy block updates) runs GPTQ unchanged, given
the symmetric matrix whose lower triangle is K. K is one Cholesky factorisation of H with
rows and columns reversed (no inverse, unlike the reference code's three factorisations).
tests/test_compress_gptq.py checks the codes against the algorithm as published.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch

from ..errors import SpfqError


@dataclass
class Plan:
    """What path following needs to run GPTQ on one layer: W (g, n, d) in GPTQ's column order
    with dead columns zeroed, S (g, d, d) holding K, and the column order perm (g, d)."""

    W: torch.Tensor
    S: torch.Tensor
    perm: torch.Tensor


def permute(t: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """t (..., g, n, d) in the layer's column order, its columns put in the order perm (g, d):
    per-column values (group-wise scales spread over the columns) that follow the weights."""
    return t.gather(-1, perm[:, None, :].expand(t.shape)).contiguous()


def restore(t: torch.Tensor, perm: torch.Tensor) -> torch.Tensor:
    """t (..., g, n, d), its columns in the order perm (g, d), back in the layer's order."""
    inv = torch.argsort(perm, dim=-1)
    return t.gather(-1, inv[:, None, :].expand(t.shape))


def plan(W: torch.Tensor, H: torch.Tensor, damp: float, act_order: bool) -> Plan:
    """GPTQ's Hessian preparation as its reference code does it: a dead column (H_tt = 0, its
    input always zero) gets H_tt = 1 and a zero weight (so its code is T(0)), the order is
    taken, then damp * mean(diag H) is added to the diagonal (any zero column would otherwise
    leave H singular)."""
    H = H.clone()
    diag = torch.diagonal(H, dim1=-2, dim2=-1)
    dead = diag == 0
    diag[dead] = 1.0
    W = W.masked_fill(dead[:, None, :], 0.0)
    d = H.shape[-1]
    if act_order:  # stable: equal diagonals keep their order, so the codes are reproducible
        perm = torch.argsort(diag, dim=-1, descending=True, stable=True)
    else:
        perm = torch.arange(d).expand(H.shape[:-1]).clone()
    diag += damp * diag.mean(-1, keepdim=True)
    H = H.gather(-1, perm[:, None, :].expand(H.shape)).gather(-2, perm[:, :, None].expand(H.shape))
    W = W.gather(-1, perm[:, None, :].expand(W.shape))
    L, info = torch.linalg.cholesky_ex(H.flip(-2, -1))
    if bool((info != 0).any()):
        raise SpfqError(f"GPTQ: the damped Hessian is not positive definite at damp {damp}; raise --damp")
    K = L.transpose(-1, -2).flip(-2, -1)  # lower, K^T K = H
    low = torch.tril(K, -1)
    S = low + low.transpose(-1, -2) + torch.diag_embed(torch.diagonal(K, dim1=-2, dim2=-1))
    return Plan(W.contiguous(), S.contiguous(), perm)
