"""CUDA backend: the nvcc build of kernels/cuda (library.py) and the export step (backend.py).
The runtime that loads the library is spfq_deploy.cuda_runtime."""

from .backend import Backend

__all__ = ["Backend"]
