"""SPFQ / GPFQ / round-to-nearest post-training compression (see shared SPFQ.md)."""

from .config import CompressConfig
from .engine import CalibrationWarning, CompressionResult, LayerReport, compress_model

__all__ = ["CalibrationWarning", "CompressConfig", "CompressionResult", "LayerReport", "compress_model"]
