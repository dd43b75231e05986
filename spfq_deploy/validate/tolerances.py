"""The pass/fail rules of `spfq-deploy validate`, per kernel kind: the one table.

Numbers are the ones tests/test_export_onnx.py and tests/test_export_tvm.py state and test:

- float: weight-only kernels / stock DequantizeLinear at accuracy level 0 / QONNX / TVM with
  float activations against the dequantised PyTorch model: equal up to float summation order.
- int8: int8-activation kernels (custom ops, TVM) against the integer reference
  (spfq_deploy.reference.int8_activation_reference). Exact layer by layer on the same input
  bits; end to end a float32 difference upstream can move an activation across an int8 rounding
  boundary, so only cosine and top-1 are held (README, "parity" paragraph).
- info: stock flavour at accuracy level 4 (int8 compute inside MatMulNBits): reported, never
  failed.

`layer_rel_err`: each compressed layer of an ONNX artifact, its output against the reference
layer applied to the artifact's own input of that layer (max abs err / max |ref|).
"""

from __future__ import annotations

from dataclasses import asdict, dataclass


@dataclass(frozen=True)
class Tolerance:
    max_rel_err: float | None  # end to end, max abs err / max |ref|
    min_cosine: float  # per sample, the minimum over samples
    top1: float | None  # top-1 agreement for classifier outputs
    layer_rel_err: float  # per compressed layer, on the artifact's own layer input
    informational: bool = False

    def as_dict(self) -> dict:
        return asdict(self)


TOLERANCES: dict[str, Tolerance] = {
    "float": Tolerance(max_rel_err=1e-4, min_cosine=0.9999, top1=1.0, layer_rel_err=1e-4),
    "int8": Tolerance(max_rel_err=None, min_cosine=0.995, top1=1.0, layer_rel_err=2e-5),
    "info": Tolerance(max_rel_err=1e-4, min_cosine=0.9999, top1=1.0, layer_rel_err=1e-4, informational=True),
}


def failures(metrics: dict, tol: Tolerance) -> list[str]:
    """The end-to-end rules `metrics` (metrics.compare) breaks, as short strings."""
    out = []
    if tol.max_rel_err is not None and not metrics["max_rel_err"] <= tol.max_rel_err:
        out.append(f"max rel err {metrics['max_rel_err']:.3g} > {tol.max_rel_err:g}")
    if not metrics["min_cosine"] >= tol.min_cosine:
        out.append(f"cosine {metrics['min_cosine']:.6f} < {tol.min_cosine:g}")
    if tol.top1 is not None and "top1_agreement" in metrics and not metrics["top1_agreement"] >= tol.top1:
        out.append(f"top-1 {100 * metrics['top1_agreement']:.1f}% < {100 * tol.top1:g}%")
    return out
