"""Layer inputs as calibration rows, and Gram accumulation over calibration batches.

Linear: every token (every leading index) is a row. Conv: rows are the real input patches
(same kernel, stride, padding, dilation), split per group, so W_g (n, Cg*kh*kw) @ row gives
the conv output; X (float model) and Xt (partly compressed model) rows come in the same order.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..errors import UnsupportedLayerError
from .distributed import Comm
from .layer import Grams

SUPPORTED = (nn.Linear, nn.Conv1d, nn.Conv2d)


def layer_kind(module: nn.Module) -> str:
    if isinstance(module, nn.Linear):
        return "linear"
    if isinstance(module, nn.Conv2d):
        return "conv2d"
    if isinstance(module, nn.Conv1d):
        return "conv1d"
    raise UnsupportedLayerError(f"unsupported layer type {type(module).__name__}")


def check_supported(name: str, module: nn.Module) -> None:
    """Raise a one-line error for layers the row extraction cannot express."""
    if not isinstance(module, SUPPORTED):
        raise UnsupportedLayerError(
            f"layer '{name}' is a {type(module).__name__}; compress supports Linear, Conv1d, Conv2d")
    if isinstance(module, (nn.Conv1d, nn.Conv2d)):
        if module.padding_mode != "zeros":
            raise UnsupportedLayerError(
                f"layer '{name}': padding_mode={module.padding_mode!r} is not supported (only zeros)")
        if isinstance(module.padding, str) and module.padding == "same" and \
                any(k % 2 == 0 for k in module.kernel_size):
            raise UnsupportedLayerError(f"layer '{name}': padding='same' with an even kernel is not supported")


def conv_params(module: nn.Module) -> dict | None:
    """Conv geometry recorded in the .spfq file (exporters rebuild the op from it)."""
    if isinstance(module, nn.Linear):
        return None
    return {"stride": list(module.stride), "padding": _padding(module), "dilation": list(module.dilation),
            "groups": int(module.groups), "kernel_size": list(module.kernel_size)}


def _padding(module) -> list[int]:
    if module.padding == "valid":
        return [0] * len(module.kernel_size)
    if module.padding == "same":
        return [d * (k - 1) // 2 for k, d in zip(module.kernel_size, module.dilation)]
    return list(module.padding)


def groups_of(module: nn.Module) -> int:
    return 1 if isinstance(module, nn.Linear) else int(module.groups)


def rows(module: nn.Module, x: torch.Tensor) -> torch.Tensor:
    """(g, m, d) calibration rows of the layer's input x."""
    return patch_rows(x, layer_kind(module), conv_params(module))


def row_chunks(module: nn.Module, x: torch.Tensor, xt: torch.Tensor, max_rows: int):
    """(X, Xt) rows of the layer inputs x, xt a few samples at a time (at most max_rows rows,
    one sample at least): a conv's patch rows are kh*kw times its input, so a whole batch of
    them (gigabytes for an early MobileNetV2 layer) never exists at once. Same rows, same order."""
    kind, conv = layer_kind(module), conv_params(module)
    if kind == "linear" or x.shape[0] <= 1:
        yield patch_rows(x, kind, conv), patch_rows(xt, kind, conv)
        return
    per = rows(module, x[:1]).shape[-2]  # rows per sample
    step = max(1, max_rows // max(per, 1))
    for b in range(0, x.shape[0], step):
        yield patch_rows(x[b:b + step], kind, conv), patch_rows(xt[b:b + step], kind, conv)


def patch_rows(x: torch.Tensor, kind: str, conv: dict | None) -> torch.Tensor:
    """(g, m, d) rows of a layer input from the geometry recorded in the .spfq file (conv_params):
    tokens for linear layers, input patches per group for convs (the same order as the weight)."""
    if kind == "linear":
        return x.reshape(1, -1, x.shape[-1])
    k, s, p, d = conv["kernel_size"], conv["stride"], conv["padding"], conv["dilation"]
    if kind == "conv1d":
        x = x.unsqueeze(2)
        k, s, p, d = (1, k[0]), (1, s[0]), (0, p[0]), (1, d[0])
    cols = F.unfold(x, tuple(k), dilation=tuple(d), padding=tuple(p), stride=tuple(s))  # (B, C*kh*kw, L)
    g = conv["groups"]
    B, CK, L = cols.shape
    return cols.reshape(B, g, CK // g, L).permute(1, 0, 3, 2).reshape(g, B * L, CK // g)


def rows_to_output(y: torch.Tensor, x: torch.Tensor, kind: str, conv: dict | None) -> torch.Tensor:
    """Inverse of patch_rows for a layer's result: y (m, N) (groups side by side) -> the layer's
    output tensor for input x (tokens keep x's leading axes; convs give (B, N, *spatial))."""
    n = y.shape[-1]
    if kind == "linear":
        return y.reshape(*x.shape[:-1], n)
    out = [conv_output_size(size, k, s, p, d) for size, k, s, p, d in
           zip(x.shape[2:], conv["kernel_size"], conv["stride"], conv["padding"], conv["dilation"])]
    return y.reshape(x.shape[0], *out, n).movedim(-1, 1).contiguous()


def conv_output_size(size: int, k: int, s: int, p: int, d: int) -> int:
    return (size + 2 * p - d * (k - 1) - 1) // s + 1


class NonFiniteRows(Exception):
    """A batch's layer input holds NaN or Inf (which: "x" float model, "xt" compressed model)."""

    def __init__(self, which: str, what: str, batch=None):
        super().__init__(which, what)
        self.which, self.what, self.batch = which, what, batch


def _nan_or_inf(X: torch.Tensor) -> str:
    return "NaN" if bool(torch.isnan(X).any()) else "Inf"


class RowShapeError(RuntimeError):
    """A batch's rows have another width than the earlier batches' (the model took it anyway)."""

    def __init__(self, features: int, before: int):
        super().__init__(f"rows of {features} features, earlier batches {before}")
        self.features, self.before = features, before


class GramAccumulator:
    """Sums Xt^T X, Xt^T Xt, X^T X (float64), and with sums=True the column sums (for bias
    correction), over batches.

    Batches come in leaves (distributed.leaves: runs of consecutive batches, fixed by the
    calibration data alone). Inside a leaf, rows are copied (float32 -> float64) into a buffer
    of FLUSH_ROWS rows that goes into the leaf's Grams in one GEMM when full (a batch of a few
    hundred tokens is too short a GEMM to run near peak); the leaves are then added in leaf
    order, along the ranks of a distributed run (distributed.Comm.ordered_sum), so the result
    depends on the batches only, not on which process ran which leaf. NaN / Inf rows show in
    the Grams' diagonals (sums of squares: no cancellation), checked after every GEMM and
    traced back to the batch that brought them."""

    FLUSH_ROWS = 4096

    def __init__(self, comm=None, sums: bool = False):
        self.comm = comm or Comm()
        self.sums = sums
        self.total = None  # (G, H, F[, sum_x, sum_xt]) folded so far (the rank owning leaf 0)
        self.parts: list[tuple] = []  # closed leaves waiting for the running sum (other ranks)
        self.leaf = None  # (leaf index, [G, H, F, sum_x, sum_xt]) being accumulated
        self.m = 0
        self._buf = None  # (X, Xt) buffers (g, rows, d) float64
        self._rows = 0  # rows pending in the buffers
        self._pending: list[tuple[int, int, int]] = []  # (batch, first row, end row) in the buffers
        self.features: int | None = None  # d of the first batch's rows
        self._lead: tuple | None = None  # leading (group) shape of the first batch's rows

    def add(self, X: torch.Tensor, Xt: torch.Tensor, leaf: int = 0, batch=None) -> None:
        """Rows X, Xt (g, m, d) of one batch (or a chunk of it) in leaf `leaf`."""
        if X.shape != Xt.shape:
            raise RuntimeError(f"float and compressed inputs differ in shape: {tuple(X.shape)} vs {tuple(Xt.shape)}")
        if self.features is not None and (X.shape[-1] != self.features or X.shape[:-2] != self._lead):
            raise RowShapeError(X.shape[-1], self.features)
        self.features, self._lead = X.shape[-1], X.shape[:-2]
        if self.leaf is not None and self.leaf[0] != leaf:
            self._close()
        if self.leaf is None:
            self.leaf = (leaf, [None] * 5)
        part = self.leaf[1]
        if self.sums:
            sx, sxt = X.sum(-2, dtype=torch.float64), Xt.sum(-2, dtype=torch.float64)
            part[3] = sx if part[3] is None else part[3].add_(sx)
            part[4] = sxt if part[4] is None else part[4].add_(sxt)
        m = X.shape[-2]
        self.m += m
        cap = max(self.FLUSH_ROWS, m)
        if self._buf is not None and (self._rows + m > self._buf[0].shape[-2]):
            self._flush()
            if self._buf[0].shape[-2] < m:
                self._buf = None
        if self._buf is None:
            shape = X.shape[:-2] + (cap, X.shape[-1])
            self._buf = (torch.empty(shape, dtype=torch.float64), torch.empty(shape, dtype=torch.float64))
        self._buf[0][..., self._rows:self._rows + m, :].copy_(X)
        self._buf[1][..., self._rows:self._rows + m, :].copy_(Xt)
        self._pending.append((batch, self._rows, self._rows + m))
        self._rows += m
        if self._rows >= self.FLUSH_ROWS:
            self._flush()

    def _flush(self) -> None:
        if not self._rows:
            return
        r, self._rows = self._rows, 0
        X, Xt = self._buf[0][..., :r, :], self._buf[1][..., :r, :]
        g = self.leaf[1]
        XtT, XT = Xt.transpose(-1, -2), X.transpose(-1, -2)
        if g[0] is None:
            g[0], g[1], g[2] = XtT @ X, XtT @ Xt, XT @ X
        else:
            g[0].baddbmm_(XtT, X)
            g[1].baddbmm_(XtT, Xt)
            g[2].baddbmm_(XT, X)
        pending, self._pending = self._pending, []
        for which, gram, rows_ in (("x", g[2], X), ("xt", g[1], Xt)):
            if not bool(torch.isfinite(gram.diagonal(dim1=-2, dim2=-1)).all()):
                for batch, a, b in pending:  # which batch brought it (the rare path)
                    chunk = rows_[..., a:b, :]
                    if not bool(torch.isfinite(chunk).all()):
                        raise NonFiniteRows(which, _nan_or_inf(chunk), batch)
                raise NonFiniteRows(which, "Inf", pending[-1][0])  # finite rows whose squares overflow

    def _close(self) -> None:
        """The current leaf is complete: fold it into the total (leaf 0's owner) or keep it."""
        self._flush()
        index, part = self.leaf
        self.leaf = None
        part = tuple(part[:5] if self.sums else part[:3])
        if self.total is not None or index == 0:
            self.total = part if self.total is None else _fold(self.total, part)
        else:
            self.parts.append(part)

    def finish(self) -> None:
        """Flush and close the last leaf (may raise NonFiniteRows); grams() then sums the ranks."""
        if self.leaf is not None:
            self._close()
        self._buf = None

    def grams(self) -> Grams:
        self.finish()
        total = self.comm.ordered_sum(self.total, self.parts, _fold)  # one process: its own total
        self.m = sum(self.comm.gather(self.m))
        self.G, self.H, self.F = total[:3]
        self.sum_x, self.sum_xt = total[3:] if self.sums else (None, None)
        return Grams(self.G, self.H, self.F, self.m)


def _fold(acc: tuple, part: tuple) -> tuple:
    return tuple(a.add_(p) for a, p in zip(acc, part))

