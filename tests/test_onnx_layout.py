"""The channels-last pass of the custom flavour (spfq_deploy/export/onnx/layout.py): transposes
pushed through elementwise nodes and cancelled between PackedConv nodes, values unchanged
(bit-identical with the NCHW graph in onnxruntime), graph outputs kept in NCHW."""

from __future__ import annotations

import numpy as np
import onnx
import pytest
from onnx import TensorProto, helper, numpy_helper
from test_export_onnx import _host_lib, _layer, _save

from spfq_deploy.compressed import CompressedModel
from spfq_deploy.export.onnx import capture as cap
from spfq_deploy.export.onnx import custom as onnx_custom
from spfq_deploy.export.onnx import graph as onnx_graph
from spfq_deploy.export.onnx.session import session


def _conv(name, n, c, k, groups=1, seed=0):
    conv = {"kernel_size": [k, k], "stride": [1, 1], "padding": [k // 2] * 2, "dilation": [1, 1], "groups": groups}
    layer = _layer("conv2d", "int", 4, seed=seed, shape=(n, c // groups, k, k), conv=conv)
    layer.name = name
    return layer


def _marker(name, x, y):
    node = helper.make_node("Layer", [x], [y], domain=cap.CAPTURE_DOMAIN, name=name)
    node.attribute.append(helper.make_attribute("name", name))
    return node


def _model(extra_output=None):
    """x -> A (1x1) -> Clip -> B (depthwise 3x3) -> PRelu -> C (1x1) -> Add(., clip) -> PRelu ->
    HardSwish -> GlobalAveragePool -> y: an inverted-residual block (the first PRelu is fused
    into B, fuse.py; the second one, after the Add, stays)."""
    layers = {"A": _conv("A", 12, 6, 1, seed=1), "B": _conv("B", 12, 12, 3, groups=12, seed=2),
              "C": _conv("C", 12, 12, 1, seed=3)}
    inits = [numpy_helper.from_array(np.float32(0.0), "lo"), numpy_helper.from_array(np.float32(6.0), "hi"),
             numpy_helper.from_array(np.linspace(0.05, 0.6, 12, dtype=np.float32).reshape(12, 1, 1), "slope"),
             numpy_helper.from_array(np.linspace(-0.3, 0.3, 12, dtype=np.float32).reshape(12, 1, 1), "slope2")]
    nodes = [_marker("A", "x", "a"), helper.make_node("Clip", ["a", "lo", "hi"], ["a6"]),
             _marker("B", "a6", "b"), helper.make_node("PRelu", ["b", "slope"], ["bp"]),
             _marker("C", "bp", "c"), helper.make_node("Add", ["c", "a6"], ["r0"]),
             helper.make_node("PRelu", ["r0", "slope2"], ["r"]), helper.make_node("HardSwish", ["r"], ["h"]), helper.make_node("GlobalAveragePool", ["h"], ["y"])]
    outs = [helper.make_tensor_value_info("y", TensorProto.FLOAT, [1, 12, 1, 1])]
    if extra_output:
        outs.append(helper.make_tensor_value_info(extra_output, TensorProto.FLOAT, [1, 12, 9, 7]))
    g = helper.make_graph(nodes, "block", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [1, 6, 9, 7])],
                          outs, initializer=inits)
    proto = helper.make_model(g)
    cm = CompressedModel(layers=layers, float_params={})
    build, domains = onnx_custom.builder("int8"), {onnx_custom.DOMAIN: 1}
    plain, _ = onnx_graph.rewrite(proto, cm, build, domains)
    last, _ = onnx_graph.rewrite(proto, cm, build, domains, onnx_custom.graph_pass)
    return plain, last


def _run(model, tmp_path, name, x):
    sess = session(_save(model, tmp_path, name), _host_lib())
    return dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": x})))


@pytest.mark.parametrize("extra", [None, "bp"])
def test_block_keeps_values_and_only_edge_transposes(tmp_path, extra):
    plain, last = _model(extra)
    ops = [n.op_type for n in last.graph.node]
    x = np.random.default_rng(0).standard_normal((1, 6, 9, 7)).astype(np.float32) * 3
    want, got = _run(plain, tmp_path, "plain.onnx", x), _run(last, tmp_path, "last.onnx", x)
    assert set(got) == set(want)
    for k in want:
        np.testing.assert_array_equal(got[k], want[k], err_msg=k)
    assert "Clip" not in ops  # ReLU6 fused into A (fuse.py)
    convs = [n for n in last.graph.node if n.op_type == "PackedConv"]
    assert {(a.name, a.f) for a in convs[0].attribute if a.name.startswith("clip")} == {("clip_min", 0.0),
                                                                                       ("clip_max", 6.0)}
    assert len(convs) == 3 and all(any(a.name == "channels_last" and a.i == 1 for a in n.attribute) for n in convs)
    fused = {a.name: helper.get_attribute_value(a) for a in convs[1].attribute}  # B's PRelu
    assert fused["fused_activation"] == b"prelu"
    np.testing.assert_array_equal(np.float32(fused["prelu_slope"]), np.linspace(0.05, 0.6, 12, dtype=np.float32))
    if extra is None:  # into NHWC at the input, back before the pooling: nothing in between
        assert ops.count("Transpose") == 2
        assert ops[0] == "Transpose" and ops[-2:] == ["Transpose", "GlobalAveragePool"]
    else:  # a graph output in the middle stays NCHW: one more transpose feeds it
        assert ops.count("Transpose") == 3
    prelu = next(n for n in last.graph.node if n.op_type == "PRelu")
    slope = next(i for i in last.graph.initializer if i.name == prelu.input[1])
    assert list(slope.dims) == [1, 1, 1, 12]  # the per-channel slope moved to the last axis
    onnx.checker.check_model(last)


def test_non_elementwise_consumers_keep_their_nchw_input(tmp_path):
    """A Flatten between two convs is not layout-agnostic: the transpose stays before it."""
    layers = {"A": _conv("A", 4, 3, 3, seed=4)}
    nodes = [_marker("A", "x", "a"), helper.make_node("Relu", ["a"], ["r"]), helper.make_node("Flatten", ["r"], ["y"])]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 5, 5])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, [2, 100])])
    cm = CompressedModel(layers=layers, float_params={})
    build, domains = onnx_custom.builder("float"), {onnx_custom.DOMAIN: 1}
    plain, _ = onnx_graph.rewrite(helper.make_model(g), cm, build, domains)
    last, _ = onnx_graph.rewrite(helper.make_model(g), cm, build, domains, onnx_custom.graph_pass)
    # the Relu is fused into the conv (fuse.py): clip_min = 0
    assert [n.op_type for n in last.graph.node] == ["Transpose", "PackedConv", "Transpose", "Flatten"]
    conv = last.graph.node[1]
    assert [(a.name, a.f) for a in conv.attribute if a.name.startswith("clip")] == [("clip_min", 0.0)]
    x = np.random.default_rng(1).standard_normal((2, 3, 5, 5)).astype(np.float32)
    np.testing.assert_array_equal(_run(last, tmp_path, "l.onnx", x)["y"], _run(plain, tmp_path, "p.onnx", x)["y"])


@pytest.mark.parametrize("pool", [dict(kernel_shape=[2, 2], strides=[2, 2]),
                                  dict(kernel_shape=[3, 3], strides=[2, 2], pads=[1, 1, 1, 1]),
                                  dict(kernel_shape=[2, 3], strides=[1, 2], pads=[0, 1, 1, 0], dilations=[2, 1]),
                                  dict(kernel_shape=[2, 2], strides=[2, 2], ceil_mode=1)])
def test_maxpool_between_convs_runs_channels_last(tmp_path, pool):
    """conv -> ReLU -> MaxPool -> conv (the MNIST CNN): the pool becomes ai.spfq.MaxPool on the
    NHWC tensor (no transposes around it), values bit-identical with the NCHW graph; a ceil-mode
    pool (not supported channels last) keeps its transposes."""
    layers = {"A": _conv("A", 5, 3, 3, seed=5), "B": _conv("B", 4, 5, 3, seed=6)}
    nodes = [_marker("A", "x", "a"), helper.make_node("Relu", ["a"], ["r"]),
             helper.make_node("MaxPool", ["r"], ["p"], **pool), _marker("B", "p", "y")]
    g = helper.make_graph(nodes, "g", [helper.make_tensor_value_info("x", TensorProto.FLOAT, [2, 3, 11, 12])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["b", 4, "h", "w"])])
    cm = CompressedModel(layers=layers, float_params={})
    build, domains = onnx_custom.builder("int8"), {onnx_custom.DOMAIN: 1}
    plain, _ = onnx_graph.rewrite(helper.make_model(g), cm, build, domains)
    last, _ = onnx_graph.rewrite(helper.make_model(g), cm, build, domains, onnx_custom.graph_pass)
    ops = [(n.domain, n.op_type) for n in last.graph.node]
    if pool.get("ceil_mode"):
        assert ("", "MaxPool") in ops and ops.count(("", "Transpose")) == 4
    else:
        assert ("ai.spfq", "MaxPool") in ops and ops.count(("", "Transpose")) == 2
    x = np.random.default_rng(2).standard_normal((2, 3, 11, 12)).astype(np.float32)
    np.testing.assert_array_equal(_run(last, tmp_path, "l.onnx", x)["y"], _run(plain, tmp_path, "p.onnx", x)["y"])
    onnx.checker.check_model(last)


def _chain_model():
    """x -> A (1x1) -> Clip -> B (depthwise 3x3) -> Clip -> C (1x1) -> D (1x1) -> y: an
    inverted-residual block without the residual, then another 1x1 (MobileNetV2's block 2)."""
    layers = {"A": _conv("A", 24, 8, 1, seed=7), "B": _conv("B", 24, 24, 3, groups=24, seed=8),
              "C": _conv("C", 16, 24, 1, seed=9), "D": _conv("D", 20, 16, 1, seed=10)}
    inits = [numpy_helper.from_array(np.float32(0.0), "lo"), numpy_helper.from_array(np.float32(6.0), "hi")]
    nodes = [_marker("A", "x", "a"), helper.make_node("Clip", ["a", "lo", "hi"], ["a6"]),
             _marker("B", "a6", "b"), helper.make_node("Clip", ["b", "lo", "hi"], ["b6"]),
             _marker("C", "b6", "c"), _marker("D", "c", "y")]
    g = helper.make_graph(nodes, "chain", [helper.make_tensor_value_info("x", TensorProto.FLOAT, ["n", 8, 9, 7])],
                          [helper.make_tensor_value_info("y", TensorProto.FLOAT, ["n", 20, 9, 7])], initializer=inits)
    cm = CompressedModel(layers=layers, float_params={})
    return helper.make_model(g), cm


def test_int8_edges_keep_values_bit_identical(tmp_path):
    """q8.py: the depthwise -> 1x1 and 1x1 -> 1x1 edges carry int8 + per-pixel scales (the
    producer quantises as its consumer would), the 1x1 -> depthwise edge stays float; outputs
    are bit-identical with float edges, and the per-layer checks of validate hold on the int8
    tensors (dequantised, within half a quantisation step of the integer reference)."""
    from spfq_deploy.export.onnx.custom import graph_pass
    from spfq_deploy.export.onnx.fuse import fuse_activations
    from spfq_deploy.export.onnx.layout import channels_last
    from spfq_deploy.reference import Int8ActivationLayer
    from spfq_deploy.validate import layers as layer_checks
    from spfq_deploy.validate.tolerances import TOLERANCES

    proto, cm = _chain_model()
    build, domains = onnx_custom.builder("int8"), {onnx_custom.DOMAIN: 1}

    def float_edges(m):
        fuse_activations(m, ("PackedConv", "PackedMatMul"), onnx_custom.DOMAIN)
        channels_last(m, "PackedConv", onnx_custom.DOMAIN)

    plain, _ = onnx_graph.rewrite(proto, cm, build, domains, float_edges)
    q8, _ = onnx_graph.rewrite(proto, cm, build, domains, graph_pass)
    prod = {n.name or n.output[-1]: n for n in q8.graph.node if n.op_type == "PackedConv"}
    q8_out = [n for n in prod.values() if any(a.name == "q8_output" and a.i for a in n.attribute)]
    assert len(q8_out) == 2  # B -> C and C -> D; A -> B (a depthwise consumer) stays float
    onnx.checker.check_model(q8)
    x = np.random.default_rng(3).standard_normal((2, 8, 9, 7)).astype(np.float32) * 2
    np.testing.assert_array_equal(_run(q8, tmp_path, "q8.onnx", x)["y"], _run(plain, tmp_path, "f.onnx", x)["y"])

    tensors = layer_checks.layer_tensors(q8, list(cm.layers))
    assert set(tensors) == set(cm.layers)
    probe = layer_checks.with_layer_outputs(q8, tensors)
    sess = session(_save(probe, tmp_path, "probe.onnx"), _host_lib())
    values = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, {"x": x})))
    values, steps = layer_checks.dequantize_q8(q8, values)
    assert len(steps) == 2
    values, steps = layer_checks.channels_first(q8, values), layer_checks.channels_first(q8, steps)
    epilogues = layer_checks.fused_epilogues(q8, tensors)

    def ref(n):
        inner = Int8ActivationLayer(cm.layers[n]) if n != "B" else _float_conv(cm.layers[n])
        return layer_checks.Fused(inner, epilogues[n]) if n in epilogues else inner

    tol = TOLERANCES["int8"]
    rows, first = layer_checks.check(values, tensors, {"x": x}, ref, {}, tol, tol, steps)
    assert first is None and all(r["local_ok"] for r in rows), rows
    assert tensors["B"][1] == tensors["C"][0]  # one int8 tensor: B's output is C's input
    # a wrong int8 code is caught: one code of B's output off by 2 steps
    bad = dict(values)
    bq = tensors["B"][1]
    bad[bq] = values[bq].copy()
    bad[bq][0, 0, 0, 0] += 2 * steps[bq][0, 0, 0, 0]
    rows, first = layer_checks.check(bad, tensors, {"x": x}, ref, {}, tol, tol, steps)
    assert first == "B"


def _float_conv(layer):
    import torch

    c = layer.conv
    conv = torch.nn.Conv2d(layer.weight_shape[1] * c["groups"], layer.rows, c["kernel_size"], c["stride"],
                           c["padding"], c["dilation"], c["groups"])
    conv.weight.data = torch.from_numpy(layer.dequantize())
    conv.bias.data = torch.from_numpy(np.asarray(layer.bias, np.float32))
    return conv
