"""compress_model: layers in execution order, X from the float model, Xt from the partly
compressed one, Gram matrices accumulated batch by batch (memory independent of the
calibration size).

Layers that read the very same input tensor (q/k/v of an attention block) form one group:
their inputs are captured in a single pass, since compressing one cannot change the others'.
Each capture pass stops the forward right after the group's input is seen.
"""

from __future__ import annotations

import contextlib
import copy
import fnmatch
import math
import time
import warnings
import zlib
from dataclasses import dataclass, field, replace

import numpy as np
import torch
from torch import nn
from tqdm import tqdm

from ..compressed import CompressedLayer, CompressedModel
from ..errors import CalibrationError, SpfqError, UnsupportedLayerError
from ..pack.layouts import storage_report
from . import calibration as calib
from . import distributed, sequential
from .activations import DEFAULT_BUDGET, ActivationStore
from .activations import rss as activation_rss
from .alphabet import Alphabet, fp16_round, group_bounds, group_sum
from .capture import (
    GramAccumulator,
    NonFiniteRows,
    RowShapeError,
    check_supported,
    conv_params,
    groups_of,
    layer_kind,
    row_chunks,
)
from .checkpoint import Checkpoint, run_key
from .config import CompressConfig
from .distributed import Comm
from .folding import find_pairs, fold
from .layer import compress_weights
from .path_following import squared_output_error


class _Stop(Exception):
    """Raised by a hook to end a forward pass once the needed input is captured."""


class EngineWarning(UserWarning):
    """The model cannot take the sequential engine; the replay engine runs instead."""


class CalibrationWarning(UserWarning):
    """Calibration data that works but is likely to give a poor model (too few samples)."""


ENGINES = ("auto", "sequential", "replay")
MIN_SAMPLES = 64  # README / SPFQ.md: quality collapses below ~64 calibration samples
ADVISED_SAMPLES = 256  # README: use at least 256


@dataclass
class LayerReport:
    name: str
    kind: str
    shape: tuple
    bits: str
    sparsity: float
    C: float | None
    lam_factor: float | None
    rel_error: float
    align_error: float | None
    rows: int
    seconds: float

    def as_dict(self) -> dict:
        return dict(self.__dict__, shape=list(self.shape))


@dataclass
class CompressionResult:
    model: CompressedModel
    report: list[LayerReport]
    reference: nn.Module  # the compressed model in PyTorch (dequantised weights)
    engine: dict = field(default_factory=dict)  # which engine ran (and why not the sequential one), memory
    curves: dict = field(default_factory=dict)  # measure mode: layer -> {width: (rel_error, total_bits, weights)}


def select_layers(model: nn.Module, include, exclude) -> list[str]:
    """Names of the layers to compress; a name pattern that hits an unsupported layer is an error."""
    mods = dict(model.named_modules())
    chosen = []
    for pat in include:
        hits = [n for n in mods if n and fnmatch.fnmatchcase(n, pat)]
        if not hits:
            raise SpfqError(f"no layer matches the pattern '{pat}'")
        supported = [n for n in hits if isinstance(mods[n], (nn.Linear, nn.Conv1d, nn.Conv2d))]
        if not any(ch in pat for ch in "*?["):  # an exact name must be a layer we can compress
            check_supported(pat, mods[pat])
        elif not supported:
            leaf = next((n for n in hits if not list(mods[n].children())), hits[0])
            raise UnsupportedLayerError(
                f"pattern '{pat}' selects no Linear/Conv layer (e.g. '{leaf}' is a {type(mods[leaf]).__name__})")
        chosen += [n for n in supported if n not in chosen]
    for pat in exclude:  # a typo would silently compress the layer meant to stay float
        if not any(n and fnmatch.fnmatchcase(n, pat) for n in mods):
            raise SpfqError(f"no layer matches the --exclude pattern '{pat}'")
    chosen = [n for n in chosen if not any(fnmatch.fnmatchcase(n, p) for p in exclude)]
    for n in chosen:
        check_supported(n, mods[n])
    if not chosen:
        raise SpfqError("no layer left to compress after --exclude")
    return chosen


def layer_widths(model: nn.Module, cfg, rules) -> dict:
    """{layer: width} of --layer-bits PATTERN=W rules over the layers cfg compresses (first
    matching rule wins); a rule that matches none of them is an error (a typo would silently
    leave a layer at --bits)."""
    from .config import _width
    names = select_layers(model, cfg.include, cfg.exclude)
    out: dict = {}
    for rule in rules:
        pat, sep, width = str(rule).partition("=")
        if not sep or not pat.strip() or not width.strip():
            raise SpfqError(f"--layer-bits {rule!r}: expected PATTERN=W, e.g. lm_head=8")
        w = _width(width.strip().lower(), f"--layer-bits {rule!r}: ")
        hits = [n for n in names if fnmatch.fnmatchcase(n, pat.strip())]
        if not hits:
            raise SpfqError(f"--layer-bits {rule!r}: no compressed layer matches '{pat.strip()}'")
        for n in hits:
            out.setdefault(n, w)
    return out


def _run(model, batch, index, source=None):
    try:
        with torch.no_grad():
            calib.call(model, batch)
    except _Stop:
        pass
    except (SpfqError, KeyboardInterrupt):
        raise
    except (SystemExit, Exception) as exc:
        raise _batch_error(exc, batch, index, source) from None


def _batch_error(exc: BaseException, batch, index: int, source=None) -> Exception:
    """The model's forward failed on a calibration batch: the one-line error to raise."""
    if isinstance(exc, (SpfqError, KeyboardInterrupt)):
        return exc
    of = f" of {source}" if source else ""
    if isinstance(exc, SystemExit):
        return CalibrationError(f"the model's forward on calibration batch {index}{of} called sys.exit({exc.code})")
    msg = str(exc).strip().splitlines()[0] if str(exc).strip() else type(exc).__name__
    return CalibrationError(f"calibration batch {index}{of} ({calib.describe(batch)}) does not fit the "
                            f"model: {type(exc).__name__}: {msg}")


def _trace(model: nn.Module, batch, names: list[str], source=None):
    """Execution order of the selected layers and groups that share one input tensor."""
    mods = dict(model.named_modules())
    calls: dict[str, list] = {n: [] for n in names}
    seen: list[str] = []
    handles = []
    for n in names:
        def hook(mod, args, n=n):
            # the tensor itself (holding it keeps identities unique) and its version counter,
            # which in-place updates bump: h += f(h) between two readers makes them not siblings
            calls[n].append((args[0], args[0]._version))
            seen.append(n)
        handles.append(mods[n].register_forward_pre_hook(hook))
    try:
        _run(model, batch, 0, source)
    finally:
        for h in handles:
            h.remove()
    order = list(dict.fromkeys(seen))
    for n in names:
        if len(calls[n]) > 1:
            raise UnsupportedLayerError(f"layer '{n}' runs {len(calls[n])} times per forward (shared weights); "
                                        f"exclude it")
    skipped = [n for n in names if not calls[n]]
    if skipped:
        warnings.warn(f"layers never run on the calibration data stay float: {', '.join(skipped)}")
    groups: list[list[str]] = []
    for n in order:
        for g in groups:  # same tensor object and same row extraction: one capture serves both
            (x0, v0), (x1, v1) = calls[g[0]][0], calls[n][0]
            if x0 is x1 and v0 == v1 and _row_key(mods[g[0]]) == _row_key(mods[n]):
                g.append(n)
                break
        else:
            groups.append([n])
    return groups


def _row_key(m: nn.Module):
    return ("linear",) if isinstance(m, nn.Linear) else (type(m).__name__, conv_params(m).__repr__())


FLOAT_ROWS_BUDGET = 3 * 2 ** 30  # bytes of float-model layer inputs kept to skip re-running the float model


def _float_rows(float_model, batches, leaders, budget=FLOAT_ROWS_BUDGET, source=None, mine=None) -> dict | None:
    """One full float pass keeping each group's input, or None when they exceed the budget
    (then every capture re-runs the float model, and memory stays independent of m)."""
    mods = dict(float_model.named_modules())
    cache = {n: [] for n in leaders}
    used = [0]

    def keep(n):
        def hook(m, args):
            r = args[0].detach().to(torch.float32, copy=True)  # later in-place ops must not reach it
            used[0] += r.numel() * 4
            if used[0] > budget:
                raise _Stop
            cache[n].append(r)
        return hook
    handles = [mods[n].register_forward_pre_hook(keep(n)) for n in leaders]
    try:
        for i in (range(len(batches)) if mine is None else mine):
            _run(float_model, batches[i], i, source)
            if used[0] > budget:
                return None
    finally:
        for h in handles:
            h.remove()
    return cache


def _capture(acc: GramAccumulator, float_model, qmodel, batches, name, float_rows=None, source=None,
             mine=None, leaf_of=None) -> None:
    """One pass over the calibration batches `mine` (all by default): rows of the layer's input
    in both models into acc (the float model's rows come from float_rows, in the order of
    mine, when cached). A non-finite row is an error naming the batch and the layer (NaN/Inf
    would silently zero the layer's codes)."""
    fmod, qmod = dict(float_model.named_modules())[name], dict(qmodel.named_modules())[name]
    mine = list(range(len(batches))) if mine is None else mine
    box = {}

    def grab(key, mod):
        def hook(m, args):
            box[key] = args[0].detach()
            raise _Stop
        return hook
    hf = fmod.register_forward_pre_hook(grab("x", fmod))
    hq = qmod.register_forward_pre_hook(grab("xt", qmod))
    try:
        for k, i in enumerate(mine):
            batch = batches[i]
            box.clear()
            if float_rows is None:
                _run(float_model, batch, i, source)
            else:
                box["x"] = float_rows[k]
            _run(qmodel, batch, i, source)
            if "x" not in box or "xt" not in box:
                raise CalibrationError(f"calibration batch {i} does not reach layer '{name}'")
            _accumulate(acc, fmod, box["x"], box["xt"], batches, i, name, source, 0 if leaf_of is None else leaf_of[i])
    finally:
        hf.remove()
        hq.remove()


def _accumulate(acc: GramAccumulator, fmod, x, xt, batches, i: int, name: str, source=None,
                leaf: int = 0) -> None:
    """Add batch i's rows of layer `name` (inputs x of the float model, xt of the compressed
    one) to acc, in the batch's leaf, a few samples at a time; errors name the batch and the
    layer."""
    with _rows_errors(batches, i, name, source):
        for X, Xt in row_chunks(fmod, x.detach(), xt.detach(), GramAccumulator.FLUSH_ROWS):
            acc.add(X.float(), Xt.float(), leaf, i)


def _group_grams(comm: Comm, cfg: CompressConfig, batches, name: str, source, fill) -> GramAccumulator:
    """A group's Gram accumulator, filled by fill(acc) with this rank's batches and closed (its
    last GEMM's non-finite rows name their batch); a failure on any rank stops every rank
    with that rank's one-line error (Comm.check)."""
    acc, failed = GramAccumulator(comm, sums=cfg.bias_correction or cfg.rescale is not None), None
    try:
        fill(acc)
        with _rows_errors(batches, None, name, source):
            acc.finish()
    except SpfqError as exc:
        failed = exc
    comm.check(failed)
    return acc


@contextlib.contextmanager
def _rows_errors(batches, i, name, source):
    try:
        yield
    except NonFiniteRows as exc:
        b = exc.batch if exc.batch is not None else i
        raise CalibrationError(_non_finite_message(batches, b, name, exc, source)) from None
    except RowShapeError as exc:  # a batch whose shape differs from the first one's
        raise CalibrationError(f"calibration batch {i} ({calib.describe(batches[i])}) gives layer '{name}' "
                               f"rows of {exc.features} features, earlier batches {exc.before}") from None


def _non_finite_message(batches, i, name, exc: NonFiniteRows, source) -> str:
    start = calib.count_samples(batches[:i])
    where = f"calibration batch {i} (samples {start}-{start + calib.count_samples(batches[i:i + 1]) - 1}" + \
        (f" of {source})" if source else ")")
    bad = calib.non_finite(batches[i])
    if bad is not None:
        what, sample, inp = bad
        return (f"{where} holds {what} (sample {start + sample}, {inp}): layer '{name}' gets a non-finite "
                f"input; calibration data must be finite")
    if exc.which == "x":
        return (f"{where}: the input of layer '{name}' is {exc.what} in the float model although the calibration "
                f"data is finite (the model's forward overflows or divides by zero)")
    return (f"{where}: the input of layer '{name}' becomes {exc.what} once the layers before it are compressed "
            f"(the float model stays finite)")


def _check_finite(model: nn.Module, note: str = "") -> None:
    """Every floating parameter finite: a NaN weight would give a model of zeros and 'rel err 0'."""
    for pname, p in model.named_parameters():
        if (p.is_floating_point() or p.is_complex()) and not bool(torch.isfinite(p).all()):
            layer, _, attr = pname.rpartition(".")
            n_nan = int(torch.isnan(p).sum())
            n_inf = int(torch.isinf(p).sum())
            parts = [f"{n_nan} NaN" if n_nan else "", f"{n_inf} Inf" if n_inf else ""]
            raise SpfqError(f"layer '{layer or pname}': its {attr or 'parameter'} holds "
                            f"{' and '.join(x for x in parts if x)}{note}")


def _warn_few(n: int) -> None:
    if n < MIN_SAMPLES:
        warnings.warn(CalibrationWarning(
            f"only {n} calibration samples: quality collapses below ~{MIN_SAMPLES}; "
            f"use at least {ADVISED_SAMPLES} (README)"), stacklevel=3)


def _layer_seed(seed: int, name: str) -> int:
    return (seed * 1_000_003 + zlib.crc32(name.encode())) % (2 ** 63)


def compress_model(model: nn.Module, calibration, config: CompressConfig | None = None, *,
                   progress: bool = True, model_spec: str | None = None, source: str | None = None,
                   engine: str = "auto", memory_budget: int = DEFAULT_BUDGET, checkpoint=None, resume: bool = False,
                   comm: Comm | None = None, measure: tuple | None = None, **options) -> CompressionResult:
    """Compress every selected Linear/Conv layer of `model` (left untouched) with SPFQ/GPFQ/GPTQ/RTN.

    engine: "sequential" (sequential.py: each model runs once, cost linear in depth), "replay"
    (each layer re-runs both models up to it) or "auto" (sequential when torch.fx can trace the
    model, else replay with a one-line EngineWarning). Both give the same codes. memory_budget:
    bytes of live activations held in RAM before they spill to mapped files (activations.py).
    checkpoint: a side file (checkpoint.py) written after every layer group; with resume=True
    the layers it holds for this very run are reused, so an interrupted run continues.
    `source` names the calibration data (a file or function) in error messages. comm: the
    torch.distributed ranks sharing the work (distributed.py; default: this process alone):
    each runs the models on its leaves of batches and its share of every layer's candidates,
    and every rank returns the same result (byte-identical to one process).

    measure: a tuple of widths (budget.py): every layer is compressed at each of them on its
    float inputs (X~ = X: nothing is applied, the compressed model stays float) and the
    result's `curves` hold each layer's relative output error and packed storage bits per
    width; the result's model holds no layers. With cfg.layer_bits, a layer named there is
    applied at that width once measured, so the layers after it are measured on its output."""
    if engine not in ENGINES:
        raise SpfqError(f"engine must be one of {', '.join(ENGINES)}, got {engine!r}")
    if isinstance(memory_budget, bool) or not isinstance(memory_budget, int) or memory_budget < 0:
        raise SpfqError(f"memory budget must be a number of bytes >= 0, got {memory_budget!r}")
    cfg = config or CompressConfig(**options)
    batches = calib.as_batches(calibration, cfg.batch_size, source)
    comm = comm or Comm()
    if comm.world > 1 and resume:
        raise SpfqError("--resume is not supported in a torchrun run yet: resume with one process")
    leaf_of = distributed.leaves([calib.count_samples([b]) for b in batches])
    span = comm.span(leaf_of[-1] + 1)
    mine = [i for i, leaf in enumerate(leaf_of) if leaf in span]  # the batches this rank runs
    _warn_few(calib.count_samples(batches))
    _check_finite(model)
    float_model = copy.deepcopy(model).eval()
    pairs = find_pairs(float_model) if cfg.fold_batchnorm else []
    fold(float_model, pairs)
    if pairs:  # a BatchNorm with broken running statistics (var + eps <= 0) breaks the layer before it
        _check_finite(float_model, " after folding BatchNorm into it (check the BatchNorm's running statistics)")
    qmodel = copy.deepcopy(float_model)
    names = select_layers(float_model, cfg.include, cfg.exclude)
    groups = _trace(float_model, batches[0], names, source)
    mods = dict(qmodel.named_modules())
    fmods = dict(float_model.named_modules())
    layers: dict[str, CompressedLayer] = {}
    report: list[LayerReport] = []
    total = sum(len(g) for g in groups)
    what = f"measure ({cfg.method}, {len(measure)} widths)" if measure else \
        f"compress ({cfg.method}, {'mixed' if cfg.layer_bits else cfg.bits}-bit)"
    bar = tqdm(total=total, desc=what, unit="layer",
               disable=not progress or not comm.root, leave=False)

    unknown = sorted(set(cfg.layer_bits) - set(names))
    if unknown:
        raise SpfqError(f"layer_bits names layers that are not compressed: {', '.join(unknown)}")
    curves: dict[str, dict] = {}
    ckpt = None
    if checkpoint is not None and comm.root and not measure:
        ckpt = Checkpoint(checkpoint, run_key(model, batches, cfg.to_dict()), resume)

    def restore(group) -> bool:
        """Apply a group's layers from the side file (--resume) instead of compressing it."""
        if ckpt is None or not ckpt.restored(group):
            return False
        for name in group:
            layers[name] = ckpt.layers[name]
            _apply(mods[name], layers[name])
            d = ckpt.reports[name]
            report.append(LayerReport(**dict(d, shape=tuple(d["shape"]))))
            bar.update(1)
        return True

    def compress_group(group, acc):
        grams = acc.grams()
        for name in group:
            bar.set_postfix_str(f"{name}: path following")
            t0 = time.perf_counter()
            if measure:
                curves[name], keep = {}, None
                for width in measure:
                    layer, rep = _compress_one(name, mods[name], grams, acc, replace(cfg, bits=width, layer_bits={}),
                                               comm, apply=False)
                    sr = storage_report(layer)
                    curves[name][rep.bits] = (rep.rel_error, sr["total_bits"], sr["weights"])
                    if name in cfg.layer_bits and cfg.layer_bits[name] == width:
                        keep = layer
                if name in cfg.layer_bits:  # later layers are measured on this one compressed
                    if keep is None:
                        keep, _ = _compress_one(name, mods[name], grams, acc, cfg.for_layer(name), comm, apply=False)
                    _apply(mods[name], keep)
                bar.update(1)
                continue
            layer, rep = _compress_one(name, mods[name], grams, acc, cfg.for_layer(name), comm)
            rep.seconds = time.perf_counter() - t0
            layers[name] = layer
            report.append(rep)
            bar.update(1)
        if ckpt is not None:
            ckpt.save(layers, {r.name: r.as_dict() for r in report})

    plan, why = None, None
    if engine in ("auto", "sequential"):
        try:
            plan = sequential.plan(float_model, sequential.sample_batch(batches), groups)
            sequential.check_batches(plan, batches)
        except sequential.NotTraceable as exc:
            why = str(exc)
            if engine == "sequential":
                raise SpfqError(f"the sequential engine cannot take this model: {why}") from None
            warnings.warn(EngineWarning(f"compressing with the replay engine (cost grows with depth squared): "
                                        f"{why}"), stacklevel=2)
    used = "sequential" if plan is not None else "replay"
    store = ActivationStore(memory_budget, rss_limit=activation_rss() + memory_budget)
    try:
        if plan is not None:
            def at_layer(group, inputs):
                if restore(group):
                    return
                bar.set_postfix_str(f"{group[0]}: inputs")
                fm = fmods[group[0]]

                def fill(acc):
                    for b, x, xt in inputs:
                        _accumulate(acc, fm, x, xt, batches, mine[b], group[0], source, leaf_of[mine[b]])
                compress_group(group, _group_grams(comm, cfg, batches, group[0], source, fill))

            sequential.propagate(plan, float_model, qmodel, [batches[i] for i in mine], at_layer,
                                 lambda exc, b: _batch_error(exc, batches[mine[b]], mine[b], source), store)
        else:
            cache = _float_rows(float_model, batches, [g[0] for g in groups], source=source, mine=mine)
            for group in groups:
                if restore(group):
                    continue
                bar.set_postfix_str(f"{group[0]}: inputs")
                rows_cache = cache and cache.pop(group[0])
                compress_group(group, _group_grams(
                    comm, cfg, batches, group[0], source,
                    lambda acc: _capture(acc, float_model, qmodel, batches, group[0], rows_cache, source,
                                         mine, leaf_of)))
    finally:
        bar.close()
        store.close()
    stats = {"engine": used, "fallback_reason": why, "peak_activation_bytes": store.peak,
             "spilled_bytes": store.spilled}
    compressed_keys = {f"{n}.{p}" for n in layers for p in ("weight", "bias")}
    float_params = {k: v.detach().cpu().numpy().copy() for k, v in qmodel.state_dict().items()
                    if k not in compressed_keys}
    meta = {"config": cfg.to_dict(), "calibration_samples": calib.count_samples(batches),
            "calibration_spread": calib.spread(batches),
            "folded_batchnorm": [list(p) for p in pairs], "torch": torch.__version__,
            "layer_order": [n for g in groups for n in g]}
    cm = CompressedModel(layers, float_params, model_spec, meta)
    return CompressionResult(cm, report, qmodel, stats, curves)


FP16_MAX = 65504.0


UNDERFLOW_SHARE = 0.01  # zeroed rows may hold at most this share of the layer's sum of w^2


def _check_scales(name, a, W) -> None:
    """Scales are stored as float16: weights too large give Inf scales (a broken model); rows too
    small get a scale of 0 and become zeros, an error when they carry a real part of the layer
    (a near-dead neuron's row may vanish). Errors name the layer."""
    R = W.abs().amax(dim=-1)  # (g, n)
    energy = (W * W).sum(-1)
    if a.group:  # group-wise scales: the ranges and energies of the groups (g, n, ngroups)
        R = torch.stack([W[..., c0:c1].abs().amax(dim=-1) for c0, c1 in group_bounds(W.shape[-1], a.group)], -1)
        energy = group_sum(W * W, a.group)
    if not (bool(torch.isfinite(a.delta).all()) and bool(torch.isfinite(a.lam).all())):
        raise SpfqError(f"layer '{name}': weights up to {float(R.max()):.3g} need scales beyond float16 "
                        f"(max {FP16_MAX:g}), the .spfq scale type; rescale the layer or exclude it")
    if a.pruned:
        return
    zeroed = (a.delta == 0) & (R > 0)
    if bool(zeroed.any()):
        if float(energy[zeroed].sum()) > UNDERFLOW_SHARE * float(energy.sum()):
            raise SpfqError(f"layer '{name}': weights this small (max |w| {float(R[zeroed].max()):.3g} in a row) "
                            f"get a float16 scale of 0 (the .spfq scale type) and would become zeros; rescale "
                            f"the layer or exclude it")


@torch.no_grad()
def _apply(module: nn.Module, layer: CompressedLayer) -> None:
    """The compressed layer's dequantised weight (and bias) into the model being compressed."""
    module.weight.copy_(torch.from_numpy(layer.dequantize()))
    if layer.bias is not None:
        if module.bias is None:
            module.bias = nn.Parameter(torch.from_numpy(layer.bias.copy()))
        else:
            module.bias.copy_(torch.from_numpy(layer.bias))


RESCALE_RANGE = (0.5, 2.0)  # a per-channel factor outside this says the statistics are unreliable


def _rescale(res, W, grams, acc, how: str):
    """Per output channel, multiply the channel's scales by s so the compressed layer's output
    statistics on the calibration rows match the float layer's (a BatchNorm after it
    re-estimated and folded; the mean is then matched by the bias shift). "var": s = std(X w) /
    std(Xt q), the variance matched; "ls": s = cov(X w, Xt q) / var(Xt q), the least-squares
    gain (never raises the centred output error). From the Grams and column sums alone; s is
    clamped to RESCALE_RANGE and 1 where a channel's output is constant."""
    m = acc.m
    mx, mxt = acc.sum_x / m, acc.sum_xt / m  # (g, d)
    Q = res.Q
    mean_w = (W * mx[:, None, :]).sum(-1)  # (g, n)
    mean_q = (Q * mxt[:, None, :]).sum(-1)
    var_w = ((W @ grams.F) * W).sum(-1) / m - mean_w ** 2
    var_q = ((Q @ grams.H) * Q).sum(-1) / m - mean_q ** 2
    if how == "var":
        s = (var_w.clamp_min(0) / var_q.clamp_min(1e-300)).sqrt()
    else:
        cov = ((Q @ grams.G) * W).sum(-1) / m - mean_q * mean_w
        s = cov / var_q.clamp_min(1e-300)
    ok = var_q > 1e-12 * var_w.abs().clamp_min(1e-300)
    s = torch.where(ok, s.clamp(*RESCALE_RANGE), torch.ones_like(s))
    a = res.alphabet
    # the scales are float16 in the file: the corrected Q is what those scales give
    f = s[..., None] if a.group else s  # group-wise scales (g, n, ngroups): one factor per row
    alph = Alphabet(a.alphabet, a.bits, fp16_round(a.delta * f), fp16_round(a.lam * f), a.pruned, a.group)
    Qn = alph.values(res.codes)
    err, ref = squared_output_error(W, Qn, grams.F, grams.G, grams.H)
    rel = math.sqrt(float(err.sum()) / float(ref.sum())) if float(ref.sum()) > 0 else 0.0
    return replace(res, alphabet=alph, Q=Qn, rel_error=rel)


@torch.no_grad()
def _compress_one(name, module, grams, acc: GramAccumulator, cfg: CompressConfig, comm=None, apply: bool = True):
    g = groups_of(module)
    Wf = module.weight.detach().double()
    N = Wf.shape[0]
    W = Wf.reshape(g, N // g, -1)
    res = compress_weights(W, grams, cfg, _layer_seed(cfg.seed, name), comm)
    if cfg.rescale:
        res = _rescale(res, W, grams, acc, cfg.rescale)
    a = res.alphabet
    K = a.K
    _check_scales(name, a, W)
    per_row = (N, -1) if cfg.group_size else (N,)  # group-wise: (N, ngroups)
    scale = (a.lam if K == 1 else a.delta).reshape(per_row).float().numpy()
    lam = a.lam.reshape(per_row).float().numpy() if (a.pruned and K > 1) else None
    bias = module.bias.detach().double() if module.bias is not None else None
    if cfg.bias_correction or cfg.rescale:
        mx, mxt = acc.sum_x / acc.m, acc.sum_xt / acc.m  # (g, d)
        shift = (W @ mx[..., None] - res.Q @ mxt[..., None]).reshape(N)
        bias = shift if bias is None else bias + shift
    layer = CompressedLayer(
        name=name, kind=layer_kind(module), weight_shape=tuple(module.weight.shape),
        alphabet=cfg.alphabet, bits=cfg.nbits, codes=res.codes.reshape(N, -1).numpy().astype(np.int8),
        scale=scale, lam=lam, bias=None if bias is None else bias.float().numpy(), conv=conv_params(module),
        meta={"method": cfg.method, "C": res.C, "lam_factor": res.lam_factor, "rel_error": res.rel_error,
              "align_error": res.align_error, "sparsity_target": cfg.sparsity, "rows": grams.m,
              "order": cfg.order}, group_size=cfg.group_size)
    layer.meta["sparsity"] = layer.sparsity
    layer.validate()
    if apply:
        _apply(module, layer)
    bits = "ternary" if cfg.alphabet == "ternary" else str(cfg.nbits)
    rep = LayerReport(name, layer.kind, layer.weight_shape, bits, layer.sparsity, res.C, res.lam_factor,
                      res.rel_error, res.align_error, grams.m, 0.0)
    return layer, rep
