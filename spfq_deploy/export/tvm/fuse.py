"""Activation fusion of the Relax module: a ReLU / ReLU6 / Clip right after a packed layer
becomes the layer's output clamp (attrs clip_lo / clip_hi; the kernels apply it in their
epilogue, spfq_set_clamp), so the layer's output is written once instead of written, read and
written again by a TVM loop. The Relax twin of export/onnx/fuse.py.

Only when the packed call's value has that one use (runs after layout.py, so a conv's ReLU
follows the channels-last call directly) and the bounds are constants; the unused call is
dropped by DeadCodeElimination.
"""

from __future__ import annotations

import math

from .graph import PACKED_FUNC, is_packed_call, with_clip


def _bounds(call) -> tuple[float, float] | None:
    """(lo, hi) of a relax ReLU or of a Clip with constant bounds."""
    from tvm import tirx

    if call.op.name == "relax.nn.relu":
        return 0.0, math.inf
    if call.op.name != "relax.clip":
        return None
    vals = [float(a.value) if isinstance(a, (tirx.FloatImm, tirx.IntImm)) else None for a in call.args[1:3]]
    if None in vals or not vals[0] <= vals[1]:
        return None
    return float(vals[0]), float(vals[1])


def _uses(func) -> dict:
    """{var: how many times the function's expressions read it}."""
    from tvm import relax

    count: dict = {}

    def visit(e):
        if isinstance(e, relax.Var):
            count[e] = count.get(e, 0) + 1

    relax.analysis.post_order_visit(func.body, visit)
    return count


def fuse_clamps(mod):
    """The module with every fusable activation folded into its packed call."""
    from tvm import ir, relax

    @relax.expr_functor.mutator
    class _Fuse(relax.PyExprMutator):
        def __init__(self, mod, uses):
            super().__init__(mod)
            self.uses = uses

        def visit_var_binding_(self, binding):
            value = binding.value
            producer = value.args[0] if isinstance(value, relax.Call) and isinstance(value.op, ir.Op) else None
            bound = self.lookup_binding(self.visit_expr(producer)) if isinstance(producer, relax.Var) else None
            bounds = _bounds(value) if bound is not None else None
            if bounds is None or not is_packed_call(bound) or self.uses.get(producer) != 1 or \
                    not isinstance(producer, relax.DataflowVar):
                super().visit_var_binding_(binding)
                return
            attrs = bound.args[1].fields[1]
            args = [bound.args[1].fields[0], relax.const(with_clip(attrs.value.numpy(), *bounds), "int64"),
                    *bound.args[1].fields[2:]]
            call = relax.call_dps_packed(PACKED_FUNC, args, bound.ty_args[0])
            bb = self.builder_
            new = bb.emit(call) if isinstance(binding.var, relax.DataflowVar) else bb.emit_output(call)
            self.set_var_remap(binding.var, new)

    for gv, func in list(mod.functions_items()):
        if isinstance(func, relax.Function):
            fuser = _Fuse(mod, _uses(func))
            fuser.builder_.update_func(gv, fuser.visit_expr(func))
            mod = fuser.builder_.get()
    return relax.transform.DeadCodeElimination()(mod)
