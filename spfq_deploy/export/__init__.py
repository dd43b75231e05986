"""Export: one job (job.py) loads a .spfq file, its model and the targets once and hands them to
each backend, which writes its artifacts into one staged folder committed at the end:

    onnx/   the ONNX flavours (custom ops, stock, QONNX) + the ONNX Runtime custom-op library
    tvm/    TVM-compiled libraries per target with the packed kernels linked in
    cuda/   the CUDA kernel library for a GPU target

source.py is what they start from (model, trace inputs, file checksums), folder.py the rules for
the output folder, native_build.py the C build the libraries share.
"""

from .job import export

__all__ = ["export"]
