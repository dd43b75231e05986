"""GPTQ as published (its fasterquant), written out once for the tests: one group, unblocked,
float64, the reference code's Hessian preparation (dead columns, act-order, damping) and the
column update through the upper Cholesky factor of the damped inverse Hessian."""

from __future__ import annotations

import numpy as np


def published_gptq(W, H, vals, codes_of, damp=0.01, act_order=False):
    """W (n, d), H (d, d) torch tensors; each weight rounded to the nearest value of its level
    table: vals, codes_of (n, L) per row, or (n, d, L) per column (group-wise scales: act-order
    carries each column's table along). Codes (n, d) int8 in the layer's column order."""
    W, H = W.numpy().copy(), H.numpy().copy()
    n, d = W.shape
    if vals.ndim == 2:
        vals = np.broadcast_to(vals[:, None, :], (n, d, vals.shape[-1]))
        codes_of = np.broadcast_to(codes_of[:, None, :], vals.shape)
    dead = np.diag(H) == 0
    H[dead, dead] = 1.0
    W[:, dead] = 0.0
    perm = np.argsort(-np.diag(H), kind="stable") if act_order else np.arange(d)
    W, H = W[:, perm], H[perm][:, perm]
    H[np.diag_indices(d)] += damp * np.mean(np.diag(H))
    Linv = np.linalg.inv(np.linalg.cholesky(H))
    U = np.linalg.cholesky(Linv.T @ Linv).T  # upper Cholesky factor of H^-1 = U^T U
    codes = np.zeros((n, d), dtype=np.int8)
    rows = np.arange(n)
    for i in range(d):
        w = W[:, i].copy()
        v, c = vals[:, perm[i]], codes_of[:, perm[i]]
        pick = np.abs(w[:, None] - v).argmin(1)
        codes[:, i] = c[rows, pick]
        W[:, i:] -= ((w - v[rows, pick]) / U[i, i])[:, None] * U[None, i, i:]
    out = np.zeros_like(codes)
    out[:, perm] = codes
    return out
