"""The SPFQ/GPFQ path-following recurrence, in data form and Gram form: the Python references.

The engine runs the Gram form through native.path_following (the same blocking and matmuls,
the column loop in C, bit-identical: tests/test_path_following_native.py); align, the error
and the helpers here are used as they are.

Shapes: W (..., n, d) neurons x inputs; X, Xt (..., m, d); G = Xt^T X, H = Xt^T Xt (..., d, d).
Leading axes are groups of a grouped conv and, during the scale search, candidate alphabets:
everything is batched over them so Python loops only over the d input columns.
`quantizer(z, t)` returns the signed int8 codes of column t; `values(codes)` dequantises them;
a `step(z, t)` returns the value q_t that the path continues with.
"""

from __future__ import annotations

from typing import Callable

import torch

Quantizer = Callable[[torch.Tensor, int], torch.Tensor]
Values = Callable[[torch.Tensor], torch.Tensor]
Step = Callable[[torch.Tensor, int], torch.Tensor]


def _inv_diag(H: torch.Tensor) -> torch.Tensor:
    """1/H_tt, and 0 for all-zero columns (z_t = 0 when Xt_t = 0)."""
    d = torch.diagonal(H, dim1=-2, dim2=-1)
    return torch.where(d > 0, 1.0 / torch.where(d > 0, d, torch.ones_like(d)), torch.zeros_like(d))


def recurrence(W, X, Xt, step: Step):
    """Data form, literally as in SPFQ.md: U (..., n, m) carries X w - Xt q. Memory grows with m."""
    U = torch.zeros(W.shape[:-1] + (X.shape[-2],), dtype=W.dtype)
    Q = torch.zeros_like(W)
    norms = (Xt * Xt).sum(-2)  # (..., d)
    for t in range(W.shape[-1]):
        U = U + W[..., t:t + 1] * X[..., None, :, t]
        n = norms[..., t:t + 1]
        proj = (U * Xt[..., None, :, t]).sum(-1)
        z = torch.where(n > 0, proj / torch.where(n > 0, n, torch.ones_like(n)), torch.zeros_like(proj))
        Q[..., t] = step(z, t)
        U = U - Q[..., t:t + 1] * Xt[..., None, :, t]
    return Q


def gram_path_following(W, G, H, step: Step, block: int = 128, out_shape=None):
    """Gram form: z_t = (sum_{j<=t} G_tj w_j - sum_{j<t} H_tj q_j) / H_tt, blocked lazy updates.

    The G part is one triangular matmul up front; the H part is applied a block at a time
    (one matmul per block plus rank-1 updates inside it), as GPTQ does. Returns Q, whose shape
    may carry extra leading (candidate) axes that only the step introduces: out_shape.
    """
    d = W.shape[-1]
    A = W @ torch.tril(G).transpose(-1, -2)  # A[..., t] = sum_{j<=t} G_tj w_j
    inv = _inv_diag(H)[..., None, :]  # (..., 1, d)
    Q = torch.zeros(out_shape or torch.broadcast_shapes(W.shape, inv.shape), dtype=W.dtype)
    for b0 in range(0, d, block):
        b1 = min(b0 + block, d)
        corr = (Q[..., :b0] @ H[..., b0:b1, :b0].transpose(-1, -2)).expand(Q[..., b0:b1].shape).clone()
        for t in range(b0, b1):
            q = step((A[..., t] - corr[..., t - b0]) * inv[..., t], t)
            Q[..., t] = q
            if t + 1 < b1:
                corr[..., t - b0 + 1:] += q[..., None] * H[..., None, t, t + 1:b1]
    return Q


def quantizing_step(quantizer: Quantizer, values: Values, codes: torch.Tensor) -> Step:
    """A step that rounds z with T, records the codes in `codes`, and returns the values."""
    def step(z, t):
        c = quantizer(z, t)
        codes[..., t] = c
        return values(c)
    return step


def align(W, G, H, order: int, block: int = 128):
    """Order-r data alignment: w~ with Xt w~ ~ X w. Pass 1 is the identity recurrence; passes
    2..r are Gauss-Seidel sweeps on ||X w - Xt w~||^2 (r -> infinity is least squares)."""
    from .native import path_following  # the same recurrence, its column loop in C

    Wt = path_following(W, G, H, None, None, block)[1]  # pass 1: T = identity
    if order <= 1:
        return Wt
    inv = _inv_diag(H)[..., None, :]
    R = W @ G.transpose(-1, -2) - Wt @ H  # residual <Xt_t, X w - Xt w~>, H symmetric
    for _ in range(order - 1):
        for t in range(W.shape[-1]):
            step = R[..., t] * inv[..., t]
            Wt[..., t] += step
            R -= step[..., None] * H[..., None, t, :]
    return Wt


def squared_output_error(W, Q, F, G, H, GW=None, wFw=None, qHq=None):
    """Per-neuron ||X w - Xt q||^2 = w'Fw - 2 q'Gw + q'Hq with F = X^T X (no data needed).

    GW = W G^T and wFw do not depend on Q: pass them in when scoring many candidates Q; so
    can q'Hq when the path following summed it (native.path_following). Returns (error, w'Fw)."""
    if wFw is None:
        wFw = ((W @ F) * W).sum(-1)
    if GW is None:
        GW = W @ G.transpose(-1, -2)
    qGw = (Q * GW).sum(-1)
    if qHq is None:
        qHq = ((Q @ H) * Q).sum(-1)
    return (wFw - 2.0 * qGw + qHq).clamp_min(0.0), wFw
