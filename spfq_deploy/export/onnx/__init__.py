"""ONNX backend: graph capture (capture.py), marker rewriting (graph.py), the three flavours
(custom.py, stock.py, qonnx.py), the ONNX Runtime custom-op library (ort_library.py), sessions
to run them (session.py), the device runner (run_onnx.py) and the export step (backend.py)."""

from .backend import FILES, FLAVOURS, Backend

__all__ = ["Backend", "FILES", "FLAVOURS"]
