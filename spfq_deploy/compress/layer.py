"""Compress one layer from its Gram matrices: scale search (C), sparsity search (lam), rounding.

The scale parameter C is searched per layer by minimising ||X w - Xt q|| over the calibration
rows (SPFQ.md), or (scale "mse") per row by minimising ||w - rtn(w)||^2 as GPTQ does; the
pruning threshold lam_i = f * quantile_s(|w_i|) gets its factor f by a bracketing search until
the realised sparsity is within tolerance of the target. Every candidate of a grid is evaluated
in one batched pass (a leading candidate axis).
"""

from __future__ import annotations

import math
from dataclasses import dataclass

import torch

from . import gptq, native
from .alphabet import Alphabet, group_sum, make_alphabet, quantize
from .config import CompressConfig
from .distributed import Comm
from .path_following import align, squared_output_error

RTN_LAM_FACTOR = 2.0
MSE_STEP = 0.01  # shrink factors 1, 0.99, ... of GPTQ's scale search (its grid=100)
MSE_LOWEST = 0.2  # GPTQ's maxshrink 0.8; K = 1 goes down to 0.05 (SPFQ.md: binary scales sit far below max|w|)
PARTS = 2  # row parts per candidate: the units of work that ranks share (distributed.py)


@dataclass
class Grams:
    """G = Xt^T X, H = Xt^T Xt, F = X^T X per group (g, d, d), float64; m calibration rows."""

    G: torch.Tensor
    H: torch.Tensor
    F: torch.Tensor
    m: int


@dataclass
class LayerResult:
    codes: torch.Tensor  # int8 (g, n, d)
    alphabet: Alphabet  # single candidate, delta/lam (g, n)
    C: float | None  # None for pruned binary/ternary (the level is lam); scale mse: the rows' mean
    lam_factor: float | None
    rel_error: float  # ||X W^T - Xt Q^T|| / ||X W^T||
    sparsity: float
    align_error: float | None
    Q: torch.Tensor  # dequantised (g, n, d) float64


class _Evaluator:
    """Runs the chosen method for (C, f) candidates of one layer, split over the ranks."""

    def __init__(self, W, grams: Grams, cfg: CompressConfig, seed: int, comm=None):
        self.W, self.g, self.cfg = W, grams, cfg
        self.comm = comm or Comm()
        self._next = 0  # candidate ids handed out
        self._codes: dict[tuple[int, int], torch.Tensor] = {}  # (id, part) -> codes, kept parts run here
        self.align_error = None
        self.pf_W, self.pf_G, self.pf_H = W, grams.G, grams.H  # path following runs on these
        if cfg.method != "rtn" and cfg.order > 1:
            Wt = align(W, grams.G, grams.H, cfg.order, cfg.block)
            err, ref = squared_output_error(W, Wt, grams.F, grams.G, grams.H)
            self.align_error = math.sqrt(float(err.sum()) / max(float(ref.sum()), 1e-300))
            self.pf_W, self.pf_G = Wt, grams.H  # phase 2 quantises w~ against Xt alone
        # ridge (gpfq / spfq): ||X w - Xt q||^2 + rho ||w - q||^2 with rho = ridge * mean(diag H)
        # per group, i.e. calibration rows plus sqrt(rho) I appended to X and Xt: the same
        # rho I added to F, G and H, so path following and the C search both see it; the reported
        # errors stay the undamped ones (the rho ||w - q||^2 part is taken back out)
        self.rho = None
        if cfg.ridge and cfg.method in ("gpfq", "spfq"):
            d = W.shape[-1]
            self.rho = cfg.ridge * grams.H.diagonal(dim1=-2, dim2=-1).mean(-1)  # (g,)
            eye = torch.eye(d, dtype=grams.H.dtype) * self.rho[:, None, None]
            grams = Grams(grams.G + eye, grams.H + eye, grams.F + eye, grams.m)
            self.g = grams
            self.pf_G, self.pf_H = (grams.H if cfg.order > 1 else grams.G), grams.H
        self.pure: dict[int, float] = {}  # candidate id -> undamped squared error (with a ridge)
        self.gptq = None
        if cfg.method == "gptq":  # GPTQ quantises (aligned) w against Xt: path following on K
            self.gptq = gptq.plan(self.pf_W, grams.H, cfg.damp, cfg.act_order)
            self.pf_W, self.pf_G, self.pf_H = self.gptq.W, self.gptq.S, self.gptq.S
        self._terms: dict[int, tuple] = {}  # part -> (GW, wFw, A) of its rows, made where the part runs
        self.wFw = None  # (g, n) w'Fw of every row, known after the first run()
        gen = torch.Generator().manual_seed(seed)
        self.U = torch.rand(W.shape, generator=gen, dtype=W.dtype) if cfg.stochastic else None

    def alphabet(self, C, f) -> Alphabet:
        cfg = self.cfg
        return make_alphabet(cfg.alphabet, cfg.nbits, self.W, C, lam_factor=f,
                             sparsity=cfg.sparsity, per_layer_delta=cfg.per_layer_delta,
                             range_quantile=cfg.range_quantile, group=cfg.group_size)

    def rows_C(self, C) -> torch.Tensor:
        """A C (scalar, per row (g, n) or, with groups, per (row, group) (g, n, ngroups)) as the
        alphabet's per-row (no groups) or per-(row, group) tensor."""
        if not self.cfg.group_size:
            return self.rows_f(C)
        ng = -(-self.W.shape[-1] // self.cfg.group_size)
        t = torch.as_tensor(1.0 if C is None else C, dtype=self.W.dtype)
        if t.dim() == len(self.W.shape) - 1:  # per row
            t = t[..., None]
        return t.expand(self.W.shape[:-1] + (ng,))

    def parts(self) -> list[tuple[int, slice]]:
        """The row parts every candidate is split into (PARTS of them, along the neurons, or
        along the groups of a depthwise conv): fixed by the layer alone, so a part's
        arithmetic is the same whichever rank runs it, and two ranks share 9 candidates evenly."""
        g, n = self.W.shape[:2]
        axis, size = (1, n) if n >= PARTS else (0, g)
        k = min(PARTS, size)
        return [(axis, slice(size * i // k, size * (i + 1) // k)) for i in range(k)]

    def run(self, Cs, fs, keep: bool = False):
        """(candidate ids, squared error (c,), zeros per row (c, g, n)) of candidates (C, f).

        The units of work are (candidate, row part); each runs on its own (never batched with
        others, so its arithmetic does not depend on how many run together), on the rank that
        owns it (distributed.Comm.span); the owner writes its per-row errors and zero counts
        (and, for candidate 0, the rows' w'Fw) into zeros that one Comm.merge completes.
        keep: hold the codes of this rank's parts for codes(id)."""
        parts = self.parts()
        units = [(i, p) for p in range(len(parts)) for i in range(len(Cs))]  # part-major: a rank
        # holding one part's units makes that part's shared terms (_part_terms) alone
        first = self._next
        self._next += len(Cs)
        c = len(Cs)
        # err, zeros, w'Fw, then (ridge) the rho ||w - q||^2 and rho ||w||^2 parts to take back out
        slots = 2 * c + 1 + (c + 1 if self.rho is not None else 0)
        out = torch.zeros((slots,) + self.W.shape[:2], dtype=torch.float64)
        for u in self.comm.span(len(units)):
            i, p = units[u]
            codes, err, zeros, pen = self._run(Cs[i], fs[i], p)
            if keep:
                self._codes[(first + i, p)] = codes
            put = _placer(parts[p])
            put(out[i], err[0])
            put(out[c + i], zeros[0])
            if i == 0:
                put(out[2 * c], self._terms[p][1])
            if pen is not None:
                put(out[2 * c + 1 + i], pen[0])
                if i == 0:
                    cut, _ = self._cuts(p)
                    put(out[3 * c + 1], self._rows_rho(cut) * (cut(self.W) ** 2).sum(-1))
        self.comm.merge(out)
        if self.wFw is None:
            self.wFw = out[2 * c].clone() - (out[3 * c + 1] if self.rho is not None else 0)
        errs = torch.stack([out[i].flatten().sum() for i in range(c)])
        if self.rho is not None:
            for i in range(c):
                self.pure[first + i] = float(errs[i] - out[2 * c + 1 + i].flatten().sum())
        return list(range(first, first + c)), errs, out[c:2 * c].long()

    def codes(self, cid: int) -> torch.Tensor:
        """The codes (1, g, n, d) of a kept candidate, its parts written by the ranks that ran
        them and merged (Comm.merge); the other kept candidates are dropped."""
        full = torch.zeros((1,) + self.W.shape, dtype=torch.int8)
        parts = self.parts()
        for (i, p), c in self._codes.items():
            if i == cid:
                _placer(parts[p])(full[0], c[0])
        self._codes.clear()
        return self.comm.merge(full)

    def rows_f(self, f) -> torch.Tensor:
        """A lam factor or a C (None, scalar or per-row tensor) as one value per row (g, n)."""
        return torch.as_tensor(1.0 if f is None else f, dtype=self.W.dtype).expand(self.W.shape[:-1])

    def _cuts(self, p):
        """(cut, same) of part p: cut takes its rows of a (g, n, ...) tensor, same its groups of
        a Gram (g, d, d) (all of them when the part splits the neurons)."""
        axis, rows = self.parts()[p]
        cut = (lambda t: t[rows]) if axis == 0 else (lambda t: t[:, rows])
        return cut, ((lambda t: t) if axis == 1 else cut)

    def _part_terms(self, p):
        """(GW, w'Fw, A) of part p's rows: what every candidate's error and path following share
        (A = native.prepare, None for rtn), computed once per part on the rank that runs it."""
        if p not in self._terms:
            cut, same = self._cuts(p)
            W = cut(self.W)
            A = None if self.cfg.method == "rtn" else native.prepare(cut(self.pf_W), same(self.pf_G))
            self._terms[p] = (W @ same(self.g.G).transpose(-1, -2), ((W @ same(self.g.F)) * W).sum(-1), A)
        return self._terms[p]

    def _rows_rho(self, cut):
        """rho per row (g', n') of a part (ridge only)."""
        return cut(self.rho[:, None].expand(self.W.shape[:2]))

    def _run(self, C, f, p):
        """One candidate on row part p: codes (1, g', n', d), squared error and zeros per row
        (1, g', n'), and with a ridge its rho ||w - q||^2 per row (else None)."""
        cut, same = self._cuts(p)
        a = self.alphabet(self.rows_C(C)[None], self.rows_f(f)[None])
        a = Alphabet(a.alphabet, a.bits, cut(a.delta[0])[None], cut(a.lam[0])[None], a.pruned, a.group)
        W = cut(self.W)
        G, H, F = same(self.g.G), same(self.g.H), same(self.g.F)
        if self.cfg.method == "rtn":
            col = a.columns(W.shape[-1])
            codes = quantize(W.expand((1,) + W.shape), col, stochastic=False)
            Q, qHq = col.values(codes), None
        else:
            # native.path_following: gram_path_following with T = quantize, the column loop in C
            U = None if self.U is None else cut(self.U)
            if a.group:  # column t rounds with its group's scale: per-column lam / delta (1, g', n', d)
                a = a.columns(W.shape[-1])
                if self.gptq is not None:  # in GPTQ's column order, as pf_W
                    a = Alphabet(a.alphabet, a.bits, gptq.permute(a.delta, same(self.gptq.perm)),
                                 gptq.permute(a.lam, same(self.gptq.perm)), a.pruned)
            codes, Q, qHq = native.path_following(cut(self.pf_W), same(self.pf_G), same(self.pf_H), a, U,
                                                  self.cfg.block, (1,) + W.shape, A=self._part_terms(p)[2],
                                                  per_column=bool(self.cfg.group_size))
            if self.gptq is not None:  # back to the layer's column order; its q'Hq was K's
                perm = same(self.gptq.perm)
                codes, Q, qHq = gptq.restore(codes, perm), gptq.restore(Q, perm), None
        GW, wFw, _ = self._part_terms(p)
        err, _ = squared_output_error(W, Q, F, G, H, GW, wFw, qHq)
        pen = None if self.rho is None else self._rows_rho(cut) * ((W - Q) ** 2).sum(-1)
        return codes, err, (codes == 0).sum(-1), pen


def _placer(part):
    """put(dst, src): src, the rows of one part, into dst (g, n, ...) at the part's rows."""
    axis, rows = part

    def put(dst, src):
        (dst[rows] if axis == 0 else dst[:, rows]).copy_(src)
    return put


def _refine(grid, best_idx):
    """Two geometric midpoints around the best grid point."""
    pts = []
    if best_idx > 0:
        pts.append(math.sqrt(grid[best_idx] * grid[best_idx - 1]))
    if best_idx < len(grid) - 1:
        pts.append(math.sqrt(grid[best_idx] * grid[best_idx + 1]))
    return pts


def _search_c(ev: _Evaluator, grid, f):
    """The best C of the grid and its two refinements, and that candidate's id (its codes kept)."""
    Cs = list(grid)
    ids, err, _ = ev.run(Cs, [f] * len(Cs), keep=True)
    best = int(torch.argmin(err))
    extra = _refine(Cs, best)
    if extra:
        ids2, err2, _ = ev.run(extra, [f] * len(extra), keep=True)
        Cs, ids, err = Cs + extra, ids + ids2, torch.cat([err, err2])
        best = int(torch.argmin(err))
    return Cs[best], (ids[best], err[best:best + 1])


def _search_lam(ev: _Evaluator, C, target, tol, rounds=10, width=9, lo=0.05, hi=8.0):
    """A lam factor per row so that the layer's realised sparsity is within tol of the target.

    Sparsity grows with the factor f (in expectation; path following makes it a noisy step
    function). First one layer-wide f is bracketed: each round keeps the neighbouring grid
    points where sparsity crosses the target, closest to the best point, and subdivides them.
    Rows are independent in path following, so when steps jump over the target, rows are then
    moved one by one to another evaluated f whose zero count closes the gap exactly."""
    d = ev.W.shape[-1]
    goal = round(target * ev.W.shape[:-1].numel() * d)  # zeros wanted in the layer
    best_f, best_gap, seen = 1.0, float("inf"), []
    for _ in range(rounds):
        fs = [lo * (hi / lo) ** (i / (width - 1)) for i in range(width)]
        zeros = ev.run([C] * width, fs)[2]  # (width, g, n)
        seen += list(zip(fs, zeros))
        totals = [int(z.sum()) for z in zeros]
        i = min(range(width), key=lambda j: abs(totals[j] - goal))
        if abs(totals[i] - goal) < best_gap:
            best_f, best_gap = fs[i], abs(totals[i] - goal)
        if best_gap <= tol * zeros[0].numel() * d or hi / lo < 1 + 1e-9:
            return best_f
        crossings = [j for j in range(width - 1) if totals[j] < goal <= totals[j + 1]]
        if crossings:
            j = min(crossings, key=lambda j: abs(j - i))
            lo, hi = fs[j], fs[j + 1]
        elif totals[-1] < goal:
            lo, hi = fs[-1], hi * 4
        else:
            lo, hi = lo / 4, fs[0]
    return _balance_rows(ev, seen, best_f, goal)


def _balance_rows(ev: _Evaluator, seen, best_f, goal):
    """Per-row factors: start from best_f and switch single rows to evaluated factors whose
    zero count moves the layer total towards the goal, nearest factors first."""
    base = dict(seen)[best_f]
    f = ev.rows_f(best_f).clone()
    count = base.clone()
    gap = goal - int(count.sum())
    options = sorted(seen, key=lambda fz: abs(math.log(fz[0] / best_f)))
    for fv, zeros in options:
        if gap == 0:
            break
        step = zeros - count  # change of each row's zeros if it moved to fv
        ok = (step != 0) & (step.sign() == (1 if gap > 0 else -1)) & (step.abs() <= abs(gap)) & (f == best_f)
        for idx in ok.nonzero().tolist():
            s = int(step[tuple(idx)])
            if abs(s) <= abs(gap):
                f[tuple(idx)] = fv
                count[tuple(idx)] += s
                gap -= s
            if gap == 0:
                break
    return f


def compress_weights(W: torch.Tensor, grams: Grams, cfg: CompressConfig, seed: int, comm=None) -> LayerResult:
    """W (g, n, d) float64 -> codes and scales for one layer, with the searched C and lam."""
    ev = _Evaluator(W, grams, cfg, seed, comm)
    K = ev.alphabet(1.0, None).K
    f = None
    if cfg.sparsity > 0 and K == 1:
        # a pruned K = 1 alphabet is {0, +-lam}: lam alone sets the level, there is no C to search
        return _finish(ev, W, None, _search_lam(ev, 1.0, cfg.sparsity, cfg.sparsity_tolerance))
    if cfg.sparsity > 0:
        # rounding to nearest zeroes |w| < lam/2, so f = 2 gives exactly s zeros before path
        # following moves them; search C there, then the factor near it
        f = RTN_LAM_FACTOR
    if cfg.scale == "mse":
        C, run = _mse_scale(ev), None
    else:
        C, run = _search_c(ev, cfg.default_grid(K), f)
    if cfg.sparsity > 0:
        f = _search_lam(ev, C, cfg.sparsity, cfg.sparsity_tolerance, lo=f / 1.6, hi=f * 1.6)
        run = None
    return _finish(ev, W, C, f, run)


def _mse_scale(ev: _Evaluator) -> torch.Tensor:
    """Per-row C (g, n) minimising ||w - rtn(w)||^2 on the unpruned alphabet: GPTQ's
    Quantizer.find_params(mse=True), with the squared error (its code: |.|^2.4) and the float16
    scales stored. Shrink factors go down from 1 by MSE_STEP; ties keep the larger one."""
    cfg, W = ev.cfg, ev.W
    shape = ev.rows_C(1.0).shape  # (g, n), or (g, n, ngroups): with groups a C per group
    best = torch.ones(shape, dtype=W.dtype)
    best_err = torch.full(shape, math.inf, dtype=W.dtype)
    lowest = 0.05 if ev.alphabet(1.0, None).K == 1 else MSE_LOWEST
    steps = round((1.0 - lowest) / MSE_STEP)
    for i in range(steps + 1):
        c = 1.0 - i * MSE_STEP
        a = make_alphabet(cfg.alphabet, cfg.nbits, W, c, range_quantile=cfg.range_quantile, group=cfg.group_size)
        col = a.columns(W.shape[-1])
        sq = (W - col.values(quantize(W, col, stochastic=False))) ** 2
        err = group_sum(sq, cfg.group_size) if cfg.group_size else sq.sum(-1)
        better = err < best_err
        best = torch.where(better, c, best)
        best_err = torch.where(better, err, best_err)
    return best


def _finish(ev: _Evaluator, W, C, f, run=None) -> LayerResult:
    """Package the chosen candidate (run once more unless (its id, its error) is given)."""
    c = 1.0 if C is None else C
    if run is None:
        ids, err, _ = ev.run([c], [f], keep=True)
        run = (ids[0], err)
    cid, err = run
    if cid in ev.pure:  # ridge: report the calibration error alone
        err = err.new_tensor([ev.pure[cid]])
    codes = ev.codes(cid)
    ref_total = float(ev.wFw.sum())
    rel = math.sqrt(float(err[0]) / ref_total) if ref_total > 0 else 0.0
    alph = ev.alphabet(ev.rows_C(c)[None], ev.rows_f(f)[None])
    Q = alph.values(codes)[0]  # what the path following continued with, bit for bit
    alph = Alphabet(alph.alphabet, alph.bits, alph.delta[0], alph.lam[0], alph.pruned, alph.group)
    f_report = None if f is None else float(torch.as_tensor(f, dtype=torch.float64).mean())
    C_report = None if C is None else float(torch.as_tensor(C, dtype=torch.float64).mean())
    zeros = int((codes == 0).sum())
    return LayerResult(codes[0], alph, C_report, f_report, rel, zeros / W.numel(), ev.align_error, Q)
