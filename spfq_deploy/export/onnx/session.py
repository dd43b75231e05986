"""Run an exported ONNX flavour the way it is meant to run: onnxruntime sessions, qonnx execution.

The one documented call for the custom-op flavour is
    so.register_custom_ops_library("lib/x86_64/libspfq_ort.so")
which `session()` does when the model imports the ai.spfq domain. The stock flavour's compute
precision is pinned with session.qdq_matmulnbits_accuracy_level (0 = float, 4 = int8): without it
onnxruntime picks int8 compute for the fused MatMulNBits on this CPU.
"""

from __future__ import annotations

import contextlib
import os
import warnings
from pathlib import Path

import onnx

from ...errors import SpfqError

CUSTOM_DOMAIN = "ai.spfq"


def uses_custom_ops(model_path: str | os.PathLike) -> bool:
    model = onnx.load(str(model_path), load_external_data=False)
    return any(o.domain == CUSTOM_DOMAIN for o in model.opset_import)


def session(model_path: str | os.PathLike, library: str | os.PathLike | None = None,
            accuracy_level: int | None = 0, threads: int = 1, optimization: str = "all", decoder: bool = False):
    """An onnxruntime InferenceSession on CPU; registers the custom-op library when needed.
    decoder: token-by-token decoding (run_onnx.decoder_threads's split of the threads)."""
    import onnxruntime as ort

    so = ort.SessionOptions()
    so.intra_op_num_threads = threads
    so.inter_op_num_threads = 1
    so.graph_optimization_level = {"all": ort.GraphOptimizationLevel.ORT_ENABLE_ALL,
                                   "basic": ort.GraphOptimizationLevel.ORT_ENABLE_BASIC,
                                   "none": ort.GraphOptimizationLevel.ORT_DISABLE_ALL}[optimization]
    so.log_severity_level = 3
    if accuracy_level is not None:
        so.add_session_config_entry("session.qdq_matmulnbits_accuracy_level", str(accuracy_level))
    if uses_custom_ops(model_path):
        if library is None:
            raise SpfqError(f"{model_path} uses ai.spfq custom ops: pass the custom-op library (lib/<target>/libspfq_ort.so)")
        if not Path(library).is_file():
            raise SpfqError(f"custom-op library {library} not found")
        if decoder:
            from .run_onnx import decoder_threads

            decoder_threads(so)
        os.environ.setdefault("SPFQ_NUM_THREADS", str(threads))
        # the packed kernels run on their own thread pool: onnxruntime's intra-op threads must
        # sleep, not spin, while they do (MobileNetV2, 2 threads: 78 ms spinning, 34 ms not)
        so.add_session_config_entry("session.intra_op.allow_spinning", "0")
        try:
            so.register_custom_ops_library(str(library))
        except Exception as exc:
            raise SpfqError(f"{library}: onnxruntime cannot load it ({str(exc).splitlines()[0]})") from None
    try:
        return ort.InferenceSession(str(model_path), so, providers=["CPUExecutionProvider"])
    except Exception as exc:
        raise SpfqError(f"{model_path}: onnxruntime cannot load it ({str(exc).splitlines()[0]})") from None


@contextlib.contextmanager
def _qonnx_node_ir_version(ir_version: int):
    """qonnx 1.0 runs each standard node as a one-node model made with onnx's default IR version
    (12+ with onnx 1.23), which onnxruntime 1.31 refuses; give those models the graph's IR."""
    from qonnx.core import onnx_exec

    original = onnx_exec.qonnx_make_model

    def make(graph, **kwargs):
        model = original(graph, **kwargs)
        model.ir_version = ir_version
        return model

    onnx_exec.qonnx_make_model = make
    try:
        yield
    finally:
        onnx_exec.qonnx_make_model = original


def run_qonnx(model_path: str | os.PathLike, feeds: dict) -> list:
    """Execute a QONNX model with the qonnx package (node by node; Quant nodes in numpy).
    qonnx needs static shapes, so the dynamic axes are fixed to the feeds' shapes first."""
    from qonnx.core.modelwrapper import ModelWrapper
    from qonnx.core.onnx_exec import execute_onnx
    from qonnx.transformation.infer_shapes import InferShapes

    model = onnx.load(str(model_path))
    for inp in model.graph.input:
        if inp.name in feeds:
            dims = inp.type.tensor_type.shape.dim
            for d, size in zip(dims, feeds[inp.name].shape):
                d.ClearField("dim_param")
                d.dim_value = int(size)
    del model.graph.value_info[:]
    for out in model.graph.output:
        out.type.tensor_type.ClearField("shape")
    wrapper = ModelWrapper(model).transform(InferShapes())
    with _qonnx_node_ir_version(model.ir_version), warnings.catch_warnings():
        warnings.simplefilter("ignore")  # qonnx warns on every node whose output shape was symbolic
        result = execute_onnx(wrapper, dict(feeds))
    return [result[o.name] for o in model.graph.output]
