"""The TVM export's own graph passes and CPU schedules (issue 15): spfq_deploy/export/tvm/
layout.py (channels last between packed convs), fuse.py (activations into the packed call),
fastmath.py (vectorisable exp / GELU) and schedule.py (matmul / row-reduction / elementwise
rules).

The schedules work on symbolic axes (batch, sequence), where TVM 0.27 needs care: a lane
predicate scalarises a vector loop, compute_at of an rfactor'ed block drops the tail predicate,
a partition hint on a static loop trips a type check. So every rule is run at whole and ragged
sizes (1, 3, 77, 128) against numpy, next to proof that each function got a schedule.
"""

from __future__ import annotations

import math

import numpy as np
import pytest
import torch
from torch import nn

from spfq_deploy.export.source import ExportInputs
from spfq_deploy.export.tvm import compile as tvm_compile
from spfq_deploy.export.tvm import graph as tvm_graph
from spfq_deploy.export.tvm import runtime as tvm_runtime
from spfq_deploy.export.tvm import schedule
from spfq_deploy.targets import get_target

HOST = get_target("x86_64")
HEAD = 32


def _float_ops_module():
    """Attention (two batched matmuls around a softmax), LayerNorm -> GELU and a transpose + add,
    over symbolic n (batch) and s (sequence)."""
    from tvm import relax, tirx

    n, s = tirx.Var("n", "int64"), tirx.Var("s", "int64")
    f32 = "float32"
    q = relax.Var("q", relax.TensorType((n, s, HEAD), f32))
    kt = relax.Var("kt", relax.TensorType((n, HEAD, s), f32))
    v = relax.Var("v", relax.TensorType((n, s, HEAD), f32))
    x = relax.Var("x", relax.TensorType((n, s, 24), f32))
    gamma = relax.Var("gamma", relax.TensorType((24,), f32))
    beta = relax.Var("beta", relax.TensorType((24,), f32))
    bb = relax.BlockBuilder()
    with bb.function("main", [q, kt, v, x, gamma, beta]):
        with bb.dataflow():
            scores = bb.emit(relax.op.multiply(relax.op.matmul(q, kt), relax.const(1 / math.sqrt(HEAD), f32)))
            att = bb.emit(relax.op.matmul(bb.emit(relax.op.nn.softmax(scores, axis=-1)), v))
            ln = bb.emit(relax.op.nn.gelu(relax.op.nn.layer_norm(x, gamma, beta, axes=[-1])))
            t = bb.emit(relax.op.add(relax.op.permute_dims(x, [0, 2, 1]), relax.const(1.0, f32)))
            out = bb.emit_output(relax.Tuple([att, ln, t]))
        bb.emit_func_output(out)
    return bb.get()


def _reference(q, kt, v, x, gamma, beta):
    scores = q @ kt / math.sqrt(HEAD)
    e = np.exp(scores - scores.max(-1, keepdims=True))
    att = (e / e.sum(-1, keepdims=True)) @ v
    mu, var = x.mean(-1, keepdims=True), x.var(-1, keepdims=True)
    ln = (x - mu) / np.sqrt(var + 1e-5) * gamma + beta
    gelu = torch.nn.functional.gelu(torch.from_numpy(ln)).numpy()
    return att, gelu, x.transpose(0, 2, 1) + 1.0


def test_every_float_function_gets_a_schedule():
    import tvm

    target = tvm_compile.tvm_target(HOST)
    with target:
        mod = tvm.transform.Sequential(schedule.fuse_passes(target) + [schedule.apply_rules()])(_float_ops_module())
    funcs = {gv.name_hint: f for gv, f in mod.functions.items() if isinstance(f, tvm.tirx.PrimFunc)}
    assert funcs and all(f.attrs.get("tirx.is_scheduled") for f in funcs.values()), sorted(funcs)


@pytest.mark.parametrize("n,s", [(1, 128), (2, 77), (1, 3), (3, 1)])
def test_scheduled_float_ops_match_numpy_at_whole_and_ragged_sizes(tmp_path_factory, n, s):
    import tvm

    lib = tmp_path_factory.getbasetemp() / "float_ops.so"
    if not lib.exists():
        target = tvm_compile.tvm_target(HOST)
        pipeline = tvm.transform.Sequential([schedule.relax_pipeline(target)])
        tvm.compile(_float_ops_module(), target=target, relax_pipeline=pipeline).export_library(str(lib))
    vm, _ = tvm_runtime.load(lib)
    rng = np.random.default_rng(n * 1000 + s)
    args = [rng.standard_normal(shape).astype(np.float32) * scale for shape, scale in
            (((n, s, HEAD), 2.0), ((n, HEAD, s), 2.0), ((n, s, HEAD), 1.0), ((n, s, 24), 3.0), ((24,), 1.0),
             ((24,), 1.0))]
    got = tvm_runtime.run(vm, *args)
    for g, want in zip(got, _reference(*args)):
        assert g.shape == want.shape
        np.testing.assert_allclose(g, want, rtol=0, atol=2e-5 * max(1.0, float(np.abs(want).max())))


def test_fast_exp_relative_error():
    """fastmath.exp_expr against numpy over the softmax range, and the clamped ends."""
    import tvm
    from tvm import te

    from spfq_deploy.export.tvm.fastmath import exp_expr

    x = te.placeholder((4096,), "float32", name="x")
    y = te.compute(x.shape, lambda i: exp_expr(x[i]), name="y")
    f = tvm.compile(te.create_prim_func([x, y]), target=tvm_compile.tvm_target(HOST))
    xs = np.concatenate([np.linspace(-87.0, 87.0, 4094), [-1e4, 0.0]]).astype(np.float32)
    out = tvm.runtime.tensor(np.zeros(4096, np.float32))
    f(tvm.runtime.tensor(xs), out)
    got, want = out.numpy().astype(np.float64), np.exp(xs.astype(np.float64))
    rel = np.abs(got[:-2] - want[:-2]) / want[:-2]
    assert rel.max() < 5e-7, rel.max()
    assert 0.0 <= got[-2] < 1e-37 and got[-1] == 1.0


class _ConvNet(nn.Module):
    """conv -> ReLU -> max pool -> conv -> ReLU6 -> residual add of a 1x1 conv -> mean -> linear."""

    def __init__(self):
        super().__init__()
        self.c1, self.c2, self.c3 = nn.Conv2d(3, 8, 3, padding=1), nn.Conv2d(8, 8, 3, padding=1), nn.Conv2d(8, 8, 1)
        self.fc = nn.Linear(8, 5)

    def forward(self, x):
        h = torch.max_pool2d(torch.relu(self.c1(x)), 2)
        h = torch.clamp(self.c2(h), 0.0, 6.0) + self.c3(h)
        return self.fc(h.mean(dim=(2, 3)))


@pytest.fixture(scope="module")
def convnet():
    from spfq_deploy.compress import compress_model

    torch.manual_seed(0)
    model = _ConvNet().eval()
    calib = torch.randn(64, 3, 12, 10, generator=torch.Generator().manual_seed(1))
    cm = compress_model(model, calib, bits=4, method="rtn", progress=False).model
    inputs = ExportInputs((calib[:2],), ["x"], ["y"], {"x": {0: "batch"}, "y": {0: "batch"}})
    return model, cm, inputs


def test_convs_stay_channels_last_and_absorb_their_activations(convnet):
    from tvm import ir, relax

    model, cm, inputs = convnet
    mod, _, _ = tvm_compile.build_module(model, cm, inputs, "float", log=lambda *a: None)
    ops, clips, pools = [], [], []

    def visit(e):
        if isinstance(e, relax.Call) and isinstance(e.op, ir.Op):
            ops.append(e.op.name)
            if e.op.name == "relax.call_dps_packed":
                at = dict(zip(tvm_graph.ATTR_FIELDS, e.args[1].fields[1].value.numpy()))
                clips.append(tuple(float(np.array(at[k], np.uint32).view(np.float32)) for k in ("clip_lo", "clip_hi")))
            if e.op.name == "relax.nn.max_pool2d":
                pools.append(e.attrs.layout)

    relax.analysis.post_order_visit(mod["main"], visit)
    # one transpose left: the RGB input into the first conv (the pooled 1x1 map is a reshape)
    assert ops.count("relax.permute_dims") == 1, ops
    assert "relax.nn.relu" not in ops and "relax.clip" not in ops
    assert pools == ["NHWC"]
    assert sorted(clips) == sorted([(0.0, math.inf), (0.0, 6.0), (-math.inf, math.inf), (-math.inf, math.inf)])


def test_channels_last_export_matches_the_dequantised_model(convnet, tmp_path):
    from spfq_deploy.reference import apply_compressed

    model, cm, inputs = convnet
    mod, _, _ = tvm_compile.build_module(model, cm, inputs, "float", log=lambda *a: None)
    vm, _ = tvm_runtime.load(tvm_compile.compile_library(mod, HOST, tmp_path / "m.so"))
    ref = apply_compressed(_ConvNet().eval(), cm)
    x = torch.randn(3, 3, 12, 10, generator=torch.Generator().manual_seed(2))
    with torch.no_grad():
        want = ref(x).numpy()
    got = tvm_runtime.run(vm, x.numpy())[0]
    np.testing.assert_allclose(got, want, rtol=0, atol=2e-5 * float(np.abs(want).max()))
