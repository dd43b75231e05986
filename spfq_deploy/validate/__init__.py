"""`spfq-deploy validate`: parity of every exported artifact with its PyTorch reference.

    metrics.py     max abs / rel error, cosine, SNR, top-1 agreement
    tolerances.py  the pass/fail rules per kernel kind (one table)
    runners.py     find the folder's artifacts, run each (onnxruntime, qonnx, TVM native / qemu)
    layers.py      per-layer checks of ONNX artifacts: the first diverging layer
    report.py      the [ok]/[x] table and the JSON
    core.py        validate(): the references, one row per artifact x target
"""

from .core import validate  # noqa: F401
from .report import table, to_json  # noqa: F401
