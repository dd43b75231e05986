"""CompressConfig: one object that says how a model is compressed (recorded in the .spfq file)."""

from __future__ import annotations

from dataclasses import asdict, dataclass, field, replace

from ..errors import SpfqError

METHODS = ("spfq", "gpfq", "gptq", "rtn")
SCALES = ("search", "mse")
RESCALES = (None, "var", "ls")  # engine.py _rescale
DEFAULT_DAMP = 0.01  # GPTQ's percdamp
DEFAULT_RIDGE = 0.0  # gpfq / spfq: no ridge unless asked (README "Calibration coverage")
MAX_RIDGE = 100.0
MAX_BLOCK = 4096  # SPFQ_PF_MAX_BLOCK of kernels/src/path_following.c
GROUP_SIZES = (32, 64, 128)  # --group-size: input columns per float16 scale (0: one scale per row)


WIDTHS = ("ternary", 1, 2, 3, 4, 5, 6, 7, 8)


def _width(bits, where: str = ""):
    """A width as CompressConfig holds it: 1..8 as int (also from a string of digits) or "ternary"."""
    if isinstance(bits, str) and bits.isdigit():
        bits = int(bits)
    if isinstance(bits, bool) or bits not in WIDTHS:
        raise SpfqError(f"{where}bits must be 1, ternary or 2..8, got {bits!r}")
    return bits


def _number(value, default: float, ok, what: str) -> float:
    """An option given as a number or a string (the command line): float(value), `default` for
    None; SpfqError "<what>, got <value>" when it is not a number or `ok` refuses it (nan too)."""
    try:
        v = float(default if value is None else value)
    except (TypeError, ValueError):
        raise SpfqError(f"{what}, got {value!r}") from None
    if not ok(v):
        raise SpfqError(f"{what}, got {value!r}")
    return v


@dataclass
class CompressConfig:
    """Options of SPFQ.md. bits: 1 (binary), "ternary", or 2..8; method: gpfq (deterministic
    path following; the default because it measured best on both real workloads), spfq
    (stochastic path following), gptq (GPTQ/OPTQ, gptq.py) or rtn (round to nearest baseline).
    scale: how delta_i = C_i R_i / K is chosen: search (one C per layer minimising the
    calibration output error) or mse (a C per row minimising ||w - rtn(w)||^2, GPTQ's choice).
    group_size: 0 (one scale per output row) or 32 / 64 / 128: one scale per (row, group of that
    many consecutive input columns), R and C (mse: per group) taken per group."""

    bits: int | str = 4
    method: str = "gpfq"
    sparsity: float = 0.0
    order: int = 1  # order-r data alignment (1 = the fused recurrence)
    scale: str = "search"
    damp: float | None = None  # gptq: H + damp * mean(diag H) * I (None: DEFAULT_DAMP)
    act_order: bool = False  # gptq: columns by decreasing diag H
    ridge: float | None = None  # gpfq / spfq: + ridge * mean(diag H) * ||w - q||^2 (None: DEFAULT_RIDGE)
    c_grid: tuple[float, ...] | None = None  # None: a default grid for the alphabet
    per_layer_delta: bool = False  # one delta per layer (the reference code's choice)
    range_quantile: float | None = None  # R_i = quantile of |w_i| instead of max
    bias_correction: bool = False
    rescale: str | None = None  # None, "var" or "ls": per-channel output statistics after compression
    fold_batchnorm: bool = True
    include: tuple[str, ...] = ("*",)  # fnmatch patterns over module names
    exclude: tuple[str, ...] = ()
    seed: int = 0
    block: int = 128  # lazy-update block of the Gram form
    batch_size: int = 64  # split size when calibration data is one tensor
    sparsity_tolerance: float = 0.005
    group_size: int = 0
    layer_bits: dict = field(default_factory=dict)  # layer name -> width overriding bits (--bits-budget)
    extra: dict = field(default_factory=dict)

    def __post_init__(self):
        self.bits = _width(self.bits)
        self.layer_bits = {str(n): _width(b, f"layer '{n}': ") for n, b in dict(self.layer_bits).items()}
        if self.method not in METHODS:
            raise SpfqError(f"method must be one of {', '.join(METHODS)}, got {self.method!r}")
        if not 0.0 <= self.sparsity < 1.0:
            raise SpfqError(f"sparsity must be in [0, 1), got {self.sparsity}")
        if self.order < 1:
            raise SpfqError(f"order must be >= 1, got {self.order}")
        self._check_gptq()
        self._check_ridge()
        if self.rescale not in RESCALES:
            raise SpfqError(f"rescale must be one of {', '.join(r for r in RESCALES if r)}, got {self.rescale!r}")
        if self.scale not in SCALES:
            raise SpfqError(f"scale must be one of {', '.join(SCALES)}, got {self.scale!r}")
        if self.scale == "mse" and (self.per_layer_delta or self.c_grid):
            raise SpfqError("scale mse picks a scale per row: it takes no c_grid and no per_layer_delta")
        if self.range_quantile is not None and not 0.0 < self.range_quantile <= 1.0:
            raise SpfqError(f"range quantile must be in (0, 1], got {self.range_quantile}")
        if self.c_grid is not None:
            self.c_grid = tuple(float(c) for c in self.c_grid) or None  # empty: the default grid
            if self.c_grid and not all(0.0 < c < float("inf") for c in self.c_grid):
                raise SpfqError(f"c_grid values must be positive finite numbers, got {self.c_grid}")
        for name in ("batch_size", "block"):
            v = getattr(self, name)
            if isinstance(v, bool) or not isinstance(v, int) or v < 1:
                raise SpfqError(f"{name} must be a positive integer, got {v!r}")
        if self.block > MAX_BLOCK:
            raise SpfqError(f"block must be at most {MAX_BLOCK} (the path-following kernel's), got {self.block}")
        if isinstance(self.group_size, bool) or self.group_size not in (0,) + GROUP_SIZES:
            raise SpfqError(f"group size must be one of {', '.join(map(str, GROUP_SIZES))}, got {self.group_size!r}")
        if self.group_size and self.per_layer_delta:
            raise SpfqError("group size and per_layer_delta contradict: one delta per layer has no groups")
        if not 0.0 <= self.sparsity_tolerance < 1.0:
            raise SpfqError(f"sparsity tolerance must be in [0, 1), got {self.sparsity_tolerance}")
        self.include, self.exclude = tuple(self.include), tuple(self.exclude)

    def _check_gptq(self) -> None:
        """damp and act_order belong to gptq; damp (also a string, from the command line) is a
        fraction in (0, 1), as GPTQ's reference code and AutoGPTQ require."""
        if self.method != "gptq":
            if self.act_order or self.damp is not None:
                raise SpfqError(f"damp and act_order apply to method gptq only, not {self.method}")
            return
        self.damp = _number(self.damp, DEFAULT_DAMP, lambda v: 0.0 < v < 1.0, "damp must be a number in (0, 1)")
        self.act_order = bool(self.act_order)

    def _check_ridge(self) -> None:
        """ridge: path following's objective gains ridge * mean(diag H) * ||w - q||^2 (the same
        multiple of I added to F, G and H), pulling Q toward W where the calibration rows say
        little: a prior for inputs the calibration does not show. gpfq / spfq only (gptq has damp)."""
        if self.method not in ("gpfq", "spfq"):
            if self.ridge is not None:
                raise SpfqError(f"ridge applies to methods gpfq and spfq, not {self.method} "
                                f"(gptq: --damp)")
            return
        self.ridge = _number(self.ridge, DEFAULT_RIDGE, lambda v: 0.0 <= v <= MAX_RIDGE,
                             f"ridge must be a number in [0, {MAX_RIDGE:g}]")

    def for_layer(self, name: str) -> CompressConfig:
        """This config with the layer's own width (layer_bits) in place of bits."""
        if name not in self.layer_bits:
            return self
        return replace(self, bits=self.layer_bits[name], layer_bits={})

    @property
    def alphabet(self) -> str:
        return {1: "binary", "ternary": "ternary"}.get(self.bits, "int")

    @property
    def nbits(self) -> int:
        return {"ternary": 2}.get(self.bits, self.bits)

    @property
    def stochastic(self) -> bool:
        return self.method == "spfq"

    def default_grid(self, K: int) -> tuple[float, ...]:
        """Geometric grids: binary/ternary scales sit far below max|w| (SPFQ.md), so reach 0.05."""
        if self.c_grid:
            return tuple(self.c_grid)
        lo, hi = (0.05, 1.2) if K == 1 else (0.25, 2.0)
        n = 9
        return tuple(lo * (hi / lo) ** (i / (n - 1)) for i in range(n))

    def to_dict(self) -> dict:
        """The options as recorded in the file; group_size only when set, so files without
        groups keep the bytes of earlier versions."""
        d = asdict(self)
        if not d["group_size"]:
            del d["group_size"]
        return d
