"""Alphabets and the rounding operators T of SPFQ.md, vectorised over neurons.

An alphabet is {0 (if has_zero)} U +-{lam + j*delta : j = 0..K-1}. Without pruning lam == delta
and this is the symmetric mid-tread grid {k*delta : |k| <= K}; binary is {+-lam} (no zero).
Codes are signed level indices k; |k| = j + 1 picks the magnitude lam + j*delta.
delta and lam are rounded to float16 here, so the packed file stores exactly what was used.
Group-wise scales (group > 0): delta and lam hold one value per (neuron, group of `group`
consecutive input columns), shape (..., n, ceil(d / group)), the last group shorter when group
does not divide d; `columns` spreads them over the d columns for the rounding of each column.
"""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np
import torch

from ..compressed import levels_for


def fp16_round(x: torch.Tensor) -> torch.Tensor:
    """Round to the nearest float16 value (scales are stored as float16). numpy rounds float64
    to float16 directly; torch goes through float32 and can round twice."""
    with np.errstate(over="ignore"):  # out-of-range scales become Inf; the engine reports the layer
        h = x.detach().cpu().numpy().astype(np.float16)
    return torch.from_numpy(h.astype(np.float64)).to(x.dtype)


@dataclass
class Alphabet:
    """Per-neuron alphabet; delta and lam broadcast against the neuron axis (..., n)."""

    alphabet: str  # "binary" | "ternary" | "int"
    bits: int
    delta: torch.Tensor
    lam: torch.Tensor
    pruned: bool = False
    group: int = 0  # > 0: delta, lam are (..., n, ngroups), one per group of this many columns

    @property
    def K(self) -> int:
        return levels_for(self.alphabet, self.bits)

    @property
    def has_zero(self) -> bool:
        return self.alphabet != "binary" or self.pruned

    def columns(self, d: int) -> "Alphabet":
        """The alphabet with delta and lam broadcasting against columns (..., n, d): (..., n, 1)
        per row, or each group's value repeated over its columns (..., n, d)."""
        if self.group:
            return Alphabet(self.alphabet, self.bits, spread(self.delta, self.group, d),
                            spread(self.lam, self.group, d), self.pruned)
        return Alphabet(self.alphabet, self.bits, self.delta[..., None], self.lam[..., None], self.pruned)

    def values(self, codes: torch.Tensor) -> torch.Tensor:
        """Dequantised values of signed codes (..., n) or (..., n, d) (grouped: (..., n, d) only)."""
        if self.group:
            return self.columns(codes.shape[-1]).values(codes)
        lam, delta = self._bcast(codes)
        mag = codes.abs().to(lam.dtype)
        return torch.sign(codes).to(lam.dtype) * (lam + (mag - 1.0).clamp_min(0.0) * delta)

    def _bcast(self, like: torch.Tensor):
        lam, delta = self.lam, self.delta
        while lam.dim() < like.dim():
            lam, delta = lam.unsqueeze(-1), delta.unsqueeze(-1)
        return lam, delta


def spread(t: torch.Tensor, group: int, d: int) -> torch.Tensor:
    """Per-group values (..., ngroups) repeated over the d columns they cover (..., d)."""
    return t.repeat_interleave(group, dim=-1)[..., :d]


def group_bounds(d: int, group: int) -> list[tuple[int, int]]:
    """The column ranges [c0, c1) of the groups of d columns (one range when group is 0)."""
    if not group:
        return [(0, d)]
    return [(c0, min(c0 + group, d)) for c0 in range(0, d, group)]


def group_sum(x: torch.Tensor, group: int) -> torch.Tensor:
    """Sums of x (..., d) over each group of columns (..., ngroups)."""
    return torch.stack([x[..., c0:c1].sum(-1) for c0, c1 in group_bounds(x.shape[-1], group)], dim=-1)


def _kth(A: torch.Tensor, fraction: float) -> torch.Tensor:
    """The fraction-quantile of A (..., d) along d as kthvalue takes it (torch.quantile refuses
    > 2^24 elements, kthvalue does not)."""
    k = max(1, min(A.shape[-1], int(round(fraction * A.shape[-1]))))
    return A.kthvalue(k, dim=-1).values


def _per_group(A: torch.Tensor, group: int, stat) -> torch.Tensor:
    """stat(A) along the columns (..., n), or per group of columns (..., n, ngroups)."""
    if not group:
        return stat(A)
    return torch.stack([stat(A[..., c0:c1]) for c0, c1 in group_bounds(A.shape[-1], group)], dim=-1)


def make_alphabet(alphabet: str, bits: int, W: torch.Tensor, C, *, lam_factor=None,
                  sparsity: float = 0.0, per_layer_delta: bool = False,
                  range_quantile: float | None = None, group: int = 0) -> Alphabet:
    """delta_i = C * R_i / K with R_i = max|w_i| (or a quantile); lam from the s-quantile when pruning.

    W is (..., n, d). C and lam_factor may be tensors with leading candidate axes so a whole
    grid of alphabets is built (and later searched) in one vectorised pass; either may also
    hold one value per row (a tensor of 2+ dims broadcasting against (..., n)).
    group > 0: R and the pruning quantile are taken per group of `group` columns, so delta and
    lam are (..., n, ngroups); then a C of 2+ dims is one value per (row, group) (..., n,
    ngroups) and a lam_factor of 2+ dims one value per row (..., n).
    """
    K = levels_for(alphabet, bits)
    A = W.abs()
    if range_quantile is None:
        R = _per_group(A, group, lambda a: a.amax(dim=-1))
    else:
        R = _per_group(A, group, lambda a: _kth(a, range_quantile))
    if per_layer_delta:
        R = R.mean().expand_as(R)  # over all groups and rows
    C = torch.as_tensor(C, dtype=W.dtype)
    delta = fp16_round((_lead(C, R) if C.dim() <= 1 else C) * R / K)
    pruned = sparsity > 0.0
    if pruned:
        if K == 1 or not group:  # K = 1: lam is the level, i.e. the group's scale
            q = _per_group(A, group, lambda a: _kth(a, sparsity))
        else:  # a magnitude threshold over the whole row (per group it would prune every group
            # alike, large-weight groups included), held per group as delta is
            q = _kth(A, sparsity)[..., None].expand(A.shape[:-1] + R.shape[-1:])
        f = torch.as_tensor(1.0 if lam_factor is None else lam_factor, dtype=W.dtype)
        # scalar or (c,) candidates lead; a (..., g, n) tensor is one factor per row
        if group and f.dim() > 1:
            f = f[..., None]
        lam = fp16_round((_lead(f, q) if f.dim() <= 1 else f) * q)
        if K == 1:  # {0, +-lam}: the single level is lam itself
            delta = lam
    else:
        lam = delta
    return Alphabet(alphabet, bits, delta, lam, pruned, group)


def _lead(c: torch.Tensor, r: torch.Tensor) -> torch.Tensor:
    """Reshape candidate values c (shape (c,) or scalar) to broadcast in front of r."""
    if c.dim() == 0:
        return c
    return c.reshape(c.shape + (1,) * r.dim())


def quantize(z: torch.Tensor, alph: Alphabet, stochastic: bool, u: torch.Tensor | None = None):
    """The operator T: codes of z (..., n) on the alphabet; stochastic rounding uses uniforms u.

    Stochastic: between adjacent levels a < |z| < b pick b with probability (|z|-a)/(b-a), so
    E[T(z)] = z inside the range; outside it clips. Binary (no zero) rounds between -lam and +lam.
    Deterministic: nearest level (ties away from zero).
    """
    lam, delta = alph.lam, alph.delta
    if not alph.has_zero:
        if stochastic:
            p_plus = ((1.0 + z / lam.clamp_min(1e-30)) * 0.5).clamp(0.0, 1.0)
            pos = u < p_plus
        else:
            pos = z >= 0
        return torch.where(pos, 1, -1).to(torch.int8)
    a = z.abs()
    safe_lam = lam.clamp_min(1e-30)
    if alph.K == 1:
        pos = a / safe_lam
    else:
        pos = torch.where(a < lam, a / safe_lam, 1.0 + (a - lam) / delta.clamp_min(1e-30))
    pos = torch.where(lam > 0, pos, torch.zeros_like(pos)).clamp(0.0, float(alph.K))
    lo = pos.floor()
    frac = pos - lo
    up = (u < frac) if stochastic else (frac >= 0.5)
    level = (lo + up.to(lo.dtype)).clamp(max=float(alph.K))
    sign = torch.where(z < 0, -1.0, 1.0).to(level.dtype)
    return (sign * level).to(torch.int8)
