"""The hand-off between compress/ and pack/: integer codes, per-channel scales and metadata.

A compressed weight row i holds signed level indices k in [-K, K] and is worth
    k == 0        -> 0
    K == 1        -> sign(k) * scale[i]                        (binary, ternary)
    lam is None   -> k * scale[i]                              (symmetric mid-tread)
    otherwise     -> sign(k) * (lam[i] + (|k| - 1) * scale[i])  (pruned: {0} U +-{lam, lam+delta, ...})
Scales are float16 values (stored as float32 arrays holding float16-representable numbers) so that
every runtime that reads the packed file computes with exactly the numbers the compressor used.
Group-wise scales (group_size G > 0): scale (and lam) hold one value per (row i, group g of G
consecutive columns), shape (N, ceil(d / G)), the last group shorter when G does not divide d;
column j of row i is worth the formula above with scale[i, j // G] (and lam[i, j // G]).
"""

from __future__ import annotations

from dataclasses import dataclass, field, replace

import numpy as np

ALPHABETS = ("binary", "ternary", "int")


def levels_for(alphabet: str, bits: int) -> int:
    """Largest level index K of an alphabet (1 for binary/ternary, 2^(b-1) - 1 for b-bit)."""
    if alphabet in ("binary", "ternary"):
        return 1
    if alphabet == "int":
        if not 2 <= bits <= 8:
            raise ValueError(f"int alphabet needs 2..8 bits, got {bits}")
        return 2 ** (bits - 1) - 1
    raise ValueError(f"unknown alphabet {alphabet!r}")


@dataclass
class CompressedLayer:
    """One compressed Linear/Conv layer, in PyTorch weight layout (N rows x d = prod(rest))."""

    name: str
    kind: str  # "linear" | "conv1d" | "conv2d"
    weight_shape: tuple[int, ...]
    alphabet: str  # "binary" | "ternary" | "int"
    bits: int  # nominal bits: 1 binary, 2 ternary, b for int
    codes: np.ndarray  # int8 (N, d): signed level indices
    scale: np.ndarray  # float32 (N,): step delta (K > 1) or level magnitude (K == 1)
    lam: np.ndarray | None = None  # float32 (N,): first nonzero magnitude of a pruned K > 1 layer
    bias: np.ndarray | None = None  # float32 (N,)
    conv: dict | None = None  # stride, padding, dilation, groups (lists/ints) for conv kinds
    meta: dict = field(default_factory=dict)  # method, C, lambda factor, seed, order, errors...
    group_size: int = 0  # > 0: scale, lam are (N, ngroups), one per group of this many columns

    @property
    def K(self) -> int:
        return levels_for(self.alphabet, self.bits)

    @property
    def rows(self) -> int:
        return int(self.weight_shape[0])

    @property
    def cols(self) -> int:
        return int(np.prod(self.weight_shape[1:]))

    @property
    def ngroups(self) -> int:
        """Scales per row: 1, or ceil(cols / group_size) with group-wise scales."""
        return -(-self.cols // self.group_size) if self.group_size else 1

    def column_scales(self, a: np.ndarray) -> np.ndarray:
        """Per-row (N,) or per-group (N, ngroups) values as (N, 1) or (N, cols): what broadcasts
        against the codes (N, cols)."""
        a = np.asarray(a, dtype=np.float32)
        if not self.group_size:
            return a[:, None]
        return np.repeat(a, self.group_size, axis=1)[:, :self.cols]

    @property
    def sparsity(self) -> float:
        return float(np.mean(self.codes == 0)) if self.codes.size else 0.0

    def dequantize(self) -> np.ndarray:
        """Float32 weight in the original PyTorch shape; the reference for all parity checks."""
        k = self.codes.astype(np.float32)
        s = self.column_scales(self.scale)
        if self.K == 1:
            w = np.sign(k) * s
        elif self.lam is None:
            w = k * s
        else:
            lam = self.column_scales(self.lam)
            w = np.sign(k) * (lam + (np.abs(k) - 1.0) * s)
        return w.reshape(self.weight_shape).astype(np.float32)

    def validate(self) -> None:
        """Check the invariants every consumer relies on; raises ValueError on violation."""
        if self.alphabet not in ALPHABETS:
            raise ValueError(f"{self.name}: unknown alphabet {self.alphabet!r}")
        K = self.K
        if self.codes.dtype != np.int8 or self.codes.shape != (self.rows, self.cols):
            raise ValueError(f"{self.name}: codes must be int8 {(self.rows, self.cols)}")
        if self.codes.size and int(np.abs(self.codes.astype(np.int16)).max()) > K:
            raise ValueError(f"{self.name}: code outside [-{K}, {K}]")
        if self.alphabet == "binary" and self.lam is None and np.any(self.codes == 0) \
                and not self.meta.get("sparsity_target"):
            raise ValueError(f"{self.name}: unpruned binary layer with zero codes")
        if self.lam is not None and K == 1:
            raise ValueError(f"{self.name}: lam is only for multi-level alphabets (K > 1); K = 1 uses scale")
        if isinstance(self.group_size, bool) or not isinstance(self.group_size, int) or self.group_size < 0:
            raise ValueError(f"{self.name}: group_size must be an integer >= 0, got {self.group_size!r}")
        want = (self.rows, self.ngroups) if self.group_size else (self.rows,)
        if self.scale.shape != want:
            raise ValueError(f"{self.name}: scale must have shape {want}")
        if self.lam is not None and self.lam.shape != want:
            raise ValueError(f"{self.name}: lam must have shape {want}")


@dataclass
class CompressedModel:
    """All compressed layers of a model plus the float parameters left as they were."""

    layers: dict[str, CompressedLayer]
    float_params: dict[str, np.ndarray]  # state_dict entries not covered by compressed layers
    model_spec: str | None = None  # "path/to/file.py:factory" used to rebuild the architecture
    meta: dict = field(default_factory=dict)  # config, seed, calibration size, versions


def rows_slice(layer: CompressedLayer, r0: int, r1: int) -> CompressedLayer:
    """The output rows [r0, r1) of a layer (one conv group) as a layer of its own."""
    cut = (lambda a: None if a is None else np.ascontiguousarray(a[r0:r1]))
    return replace(layer, weight_shape=(r1 - r0,) + tuple(layer.weight_shape[1:]), codes=layer.codes[r0:r1],
                   scale=cut(layer.scale), lam=cut(layer.lam), bias=cut(layer.bias))
