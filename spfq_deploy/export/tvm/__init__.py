"""TVM backend: the graph with packed-layer calls (graph.py), the kernel objects linked into
every library (library.py), compiling for a target (compile.py), loading / running a library
here (runtime.py), the device runner (run_tvm.py) and the export step (backend.py)."""

from .backend import Backend

__all__ = ["Backend"]
