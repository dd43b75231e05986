"""--bits-budget B: each layer's width from measured error curves, the file's average <= B.

Three steps (README "Bit budgets"):
1. Measure (`measure`): one pass of the engine in measure mode (engine.compress_model with
   measure=widths). At every layer, on the same Gram matrices, the layer is compressed at each
   candidate width with the user's method and options, on its float inputs (X~ = X: nothing is
   applied, so the curves of a layer do not depend on the widths later given to the layers
   before it). Per layer and width it records the relative output error ||XW' - XQ'|| / ||XW'||
   and the packed storage bits that pack/ reports for the layout the file would use (codes,
   masks, float16 scales, padding). Cost: one forward pass of both models plus, per layer,
   len(widths) compressions: about len(widths) times a plain compress of the same method.
2. Allocate (`allocate`): minimise sum over layers of rel_err^2 (each layer's relative error
   counted alike: a relative perturbation of one layer reaches the output as a relative
   perturbation of about its size, and independent ones add in squares; weighting by output
   energy would make the rule depend on the scale of each layer's activations, which BatchNorm
   folding and residual streams move freely) subject to sum of storage bits <= B * weights and
   >= (B - CLOSE) * weights (or, where no assignment gets that close, within CLOSE of the
   fullest assignment that fits): the file uses its budget even where the curves are flat.
   An exact multiple-choice knapsack by dynamic programming over the storage bits; where the
   budget holds more than MAX_CELLS bits, the bits are counted in cells of u bits, every
   layer's cost rounded up (so the result still keeps the budget exactly) and the optimum is
   over assignments whose costs fit the rounded budget (at most layers * u bits are lost).
   Ties keep the assignment with more bits, then the earlier candidate.
3. Compress (`compress_with_budget`): the ordinary pass with CompressConfig.layer_bits, and
   the budget, candidates, curves and allocation recorded in the file's meta ("bits_budget").

The storage of an unpruned layer depends on its shape and width alone, so the bits predicted
here are the file's bits exactly; pruning (whose sparse layout depends on the codes) is refused
with a budget.
"""

from __future__ import annotations

import math
import time
from dataclasses import dataclass, replace
from fractions import Fraction

import numpy as np

from ..compressed import CompressedLayer
from ..errors import SpfqError
from ..pack.layouts import storage_report
from .config import CompressConfig

CANDIDATES = (1, "ternary", 2, 3, 4, 8)
MAX_CELLS = 200_000  # DP columns: exact (1 bit per cell) for budgets up to this many bits
CLOSE = 0.02  # the file's bits/weight is kept within this of the budget where the layer sizes allow


def label(width) -> str:
    """A width as the report and the file write it: "ternary" or "4"."""
    return "ternary" if width == "ternary" else str(int(width))


def _width(token: str):
    t = token.strip().lower()
    if t in ("ternary", "t", "1.58"):
        return "ternary"
    if t.isdigit() and 1 <= int(t) <= 8:
        return int(t)
    raise SpfqError(f"--bits-candidates: unknown candidate {token.strip()!r} (give 1, ternary or 2..8)")


def parse_candidates(text: str | None) -> tuple:
    """Comma-separated widths (duplicates dropped, order kept); None: CANDIDATES."""
    if text is None:
        return CANDIDATES
    widths = [_width(t) for t in text.split(",") if t.strip()]
    if not widths:
        raise SpfqError(f"--bits-candidates: no candidate in {text!r} (e.g. 1,ternary,2,3,4)")
    return tuple(dict.fromkeys(widths))


def parse_budget(text) -> float:
    try:
        v = float(text)
    except (TypeError, ValueError):
        raise SpfqError(f"--bits-budget: not a number: {text!r} (bits per weight, e.g. 2.5)") from None
    if not 0 < v < math.inf:  # also refuses nan
        raise SpfqError(f"--bits-budget must be a positive finite number of bits per weight, got {text!r}")
    return v


def storage_bits(name: str, kind: str, shape: tuple, width) -> tuple[int, int]:
    """(total storage bits, weights) pack/ gives an unpruned layer of this shape and width in the
    layout a file would hold it in (placeholder codes: the count depends on shape and width)."""
    cfg = CompressConfig(bits=width)
    N, d = int(shape[0]), int(np.prod(shape[1:]))
    layer = CompressedLayer(name, kind, tuple(shape), cfg.alphabet, cfg.nbits, np.ones((N, d), np.int8),
                            np.ones(N, np.float32))
    sr = storage_report(layer)
    return sr["total_bits"], sr["weights"]


def _budget_bits(budget: float, weights: int) -> int:
    """The most storage bits a file of `weights` weights may hold at `budget` bits/weight, exactly
    (the decimal the user wrote, not its binary float, times the weights, rounded down)."""
    return math.floor(Fraction(repr(budget)) * weights)


def check_budget(budget: float, candidates, layers: dict) -> None:
    """Bad budgets before the (slow) measurement. layers: name -> (kind, weight shape)."""
    lo = hi = weights = 0
    for name, (kind, shape) in layers.items():
        costs = [storage_bits(name, kind, shape, w) for w in candidates]
        lo += min(c for c, _ in costs)
        hi += max(c for c, _ in costs)
        weights += costs[0][1]
    if _budget_bits(budget, weights) < lo:
        raise SpfqError(f"--bits-budget {budget:g} is below {lo / weights:.4f} bits/weight, what the smallest "
                        f"candidates take on this model (scales and padding included)")
    if budget > hi / weights:
        raise SpfqError(f"--bits-budget {budget:g} is above {hi / weights:.4f} bits/weight, what the largest "
                        f"candidate takes on this model: give --bits instead")


@dataclass
class Allocation:
    widths: dict  # layer -> width label
    total_bits: int
    weights: int
    objective: float  # sum of rel_err^2 of the chosen widths
    budget_bits: int  # the most bits the budget allows
    closest_bits: int  # the most bits any assignment reaches within the budget (cell-exact)
    cell_bits: int  # DP cell size (1: exact)

    @property
    def bits_per_weight(self) -> float:
        return self.total_bits / self.weights


def objective(curves: dict, widths: dict) -> float:
    """Sum over layers (in the curves' order) of the chosen width's rel_err^2."""
    return sum(curves[n][widths[n]][0] ** 2 for n in curves)


def allocate(curves: dict, budget: float, close: float | None = CLOSE, max_cells: int = MAX_CELLS) -> Allocation:
    """The widths minimising objective() with total storage bits <= budget * weights and, when
    close is given, at least (min(budget, fullest) - close) * weights, where fullest is the most
    bits/weight any assignment reaches within the budget (so the file is within `close` of the
    budget whenever the layer sizes allow it, and within `close` of the fullest fit otherwise).

    curves: layer -> {width label: (rel_error, total_bits, weights)} (engine measure mode)."""
    names = list(curves)
    weights = sum(next(iter(curves[n].values()))[2] for n in names)
    cap_bits = _budget_bits(budget, weights)
    u = max(1, -(-cap_bits // max_cells))
    cap = cap_bits // u
    best = np.full(cap + 1, np.inf)  # least objective with exactly k cells spent
    reach = np.full(cap + 1, -1, dtype=np.int64)  # most true bits among assignments of k cells
    best[0], reach[0] = 0.0, 0
    choice = np.full((len(names), cap + 1), -1, dtype=np.int16)
    for i, n in enumerate(names):
        opts = list(curves[n].items())
        new = np.full(cap + 1, np.inf)
        new_reach = np.full(cap + 1, -1, dtype=np.int64)
        for j, (_, (err, bits, _)) in enumerate(opts):
            c = -(-bits // u)
            if c > cap:
                continue
            cand = np.full(cap + 1, np.inf)
            cand[c:] = best[:cap + 1 - c] + err * err
            better = cand < new
            new[better] = cand[better]
            choice[i, better] = j
            r = np.full(cap + 1, -1, dtype=np.int64)
            r[c:] = np.where(reach[:cap + 1 - c] >= 0, reach[:cap + 1 - c] + bits, -1)
            np.maximum(new_reach, r, out=new_reach)
        best, reach = new, new_reach
    if not np.isfinite(best).any():
        cheapest = {n: min(curves[n], key=lambda w: (curves[n][w][1], curves[n][w][0])) for n in names}
        total = sum(curves[n][cheapest[n]][1] for n in names)
        if total > cap_bits:
            raise SpfqError(f"--bits-budget {budget:g}: no assignment of the candidates fits")
        # only the rounded-up cell costs overflow: the cheapest widths fit exactly (and alone)
        return Allocation(cheapest, total, weights, objective(curves, cheapest), cap_bits, total, u)
    closest = int(reach.max())
    lo = 0
    if close is not None:  # the band of totals the file may have, in cells
        lo_bits = min(Fraction(repr(budget)) * weights, closest + Fraction(repr(close)) * weights) - \
            Fraction(repr(close)) * weights
        lo = max(0, min(math.ceil(lo_bits / u), int(np.flatnonzero(reach == closest)[-1])))
    low = best[lo:].min()
    k = lo + int(np.flatnonzero(best[lo:] == low)[-1])  # ties: the assignment with more cells
    widths = {}
    for i in range(len(names) - 1, -1, -1):
        opts = list(curves[names[i]].items())
        w, (_, bits, _) = opts[choice[i, k]]
        widths[names[i]] = w
        k -= -(-bits // u)
    widths = {n: widths[n] for n in names}
    total = sum(curves[n][widths[n]][1] for n in names)
    return Allocation(widths, total, weights, objective(curves, widths), cap_bits, closest, u)


def measure(model, calibration, cfg: CompressConfig, candidates, upstream: dict | None = None,
            **engine_options) -> tuple[dict, float]:
    """(curves, seconds) of the engine's measure mode (see the module docstring). upstream:
    layer -> width: measure every layer on the outputs of the layers before it compressed at
    these widths instead of float ones (an experiment: README "Bit budgets")."""
    from .engine import compress_model

    t0 = time.perf_counter()
    res = compress_model(model, calibration, replace(cfg, layer_bits=dict(upstream or {})),
                         measure=tuple(candidates), **engine_options)
    return res.curves, time.perf_counter() - t0


def compress_with_budget(model, calibration, cfg: CompressConfig, budget: float, candidates=CANDIDATES,
                         *, curves: dict | None = None, checkpoint=None, resume: bool = False, **engine_options):
    """Measure, allocate, compress: a CompressionResult whose model's meta holds "bits_budget".
    curves: measure()'s curves of this very model, calibration and cfg for these candidates
    (several budgets from one measurement); None: measured here."""
    from .engine import compress_model, select_layers

    if cfg.sparsity > 0:
        raise SpfqError("--bits-budget with --sparsity is not supported: pruned layers' storage depends on "
                        "their codes")
    mods = dict(model.named_modules())
    names = select_layers(model, cfg.include, cfg.exclude)
    check_budget(budget, candidates, {n: (_kind(mods[n]), tuple(mods[n].weight.shape)) for n in names})
    if curves is None:
        curves, measure_s = measure(model, calibration, cfg, candidates, **engine_options)
    else:
        measure_s = None
        if list(curves) != names or any(list(c) != [label(w) for w in candidates] for c in curves.values()):
            raise SpfqError("curves given for other layers or candidates than this compression's")
    alloc = allocate(curves, budget)
    t0 = time.perf_counter()
    res = compress_model(model, calibration, replace(cfg, layer_bits=dict(alloc.widths)),
                         checkpoint=checkpoint, resume=resume, **engine_options)
    compress_s = time.perf_counter() - t0
    res.model.meta["bits_budget"] = {
        "budget": budget, "candidates": [label(w) for w in candidates], "widths": alloc.widths,
        "achieved_bits_per_weight": alloc.bits_per_weight, "total_bits": alloc.total_bits,
        "weights": alloc.weights, "closest_bits_per_weight": alloc.closest_bits / alloc.weights,
        "objective": alloc.objective, "cell_bits": alloc.cell_bits,
        "rule": f"least sum of rel_err^2 (float-input curves) with storage bits <= budget and within {CLOSE} "
                f"bits/weight of it where the layer sizes allow (DP over storage bits)",
        "curves": {n: {w: {"rel_error": e, "total_bits": b} for w, (e, b, _) in c.items()}
                   for n, c in curves.items()},
        "layer_weights": {n: next(iter(c.values()))[2] for n, c in curves.items()}}
    res.engine["budget_seconds"] = {"measure": measure_s, "compress": compress_s}  # not in the file: same bytes
    return res


def _kind(module) -> str:
    from .capture import layer_kind

    return layer_kind(module)
