"""Channels-last pass of the Relax module: activations stay NHWC between compressed convs.

graph.py wraps every packed conv as permute_dims(to NHWC) -> spfq_packed_layer ->
permute_dims(to NCHW), since the kernels run channels last (a 1x1 conv is the GEMM on the
pixels as they lie, depthwise convs keep channels in vector lanes) while the imported PyTorch
program is channels first. This pass, the Relax twin of export/onnx/layout.py:

1. gives every value computed from a packed conv's output by layout-agnostic ops a
   channels-last twin: elementwise ops (ReLU, Clip, sigmoid, ..., and binary ops whose other
   inputs are constants or have a twin too: the residual Add), 2-D max / average pooling
   (layout NHWC);
2. feeds a permute_dims to NHWC of a value with a twin that twin instead (the inverse pairs
   between consecutive convs cancel), and a spatial mean of one its NHWC mean;
3. turns a permute_dims that moves only unit axes (a 1-channel image, a pooled 1x1 map) into
   a reshape (no copy);
4. drops what nothing reads (DeadCodeElimination), so each value is computed in the layout
   its consumers read; values stay the same, only where the data lies moves.
"""

from __future__ import annotations

import numpy as np

from .graph import TO_FIRST, TO_LAST, is_packed_call

UNARY = {"relax.nn.relu", "relax.clip", "relax.nn.leakyrelu", "relax.sigmoid", "relax.tanh", "relax.nn.silu",
         "relax.nn.gelu", "relax.nn.gelu_tanh", "relax.exp", "relax.erf", "relax.negative", "relax.abs"}
BINARY = {"relax.add", "relax.subtract", "relax.multiply", "relax.divide", "relax.maximum", "relax.minimum",
          "relax.power"}
POOLS = {"relax.nn.max_pool2d", "relax.nn.avg_pool2d"}
REDUCE = ("relax.mean", "relax.sum", "relax.max")


def _op(e) -> str | None:
    from tvm import ir, relax

    return e.op.name if isinstance(e, relax.Call) and isinstance(e.op, ir.Op) else None


def _axes(call) -> list[int]:
    return [int(a) for a in call.attrs.axes]


def _static_shape(e) -> list | None:
    """The shape with static axes as ints and symbolic ones as None; None when unknown."""
    from tvm import tirx

    shape = getattr(getattr(e.ty, "shape", None), "values", None)
    if shape is None:
        return None
    return [int(s) if isinstance(s, tirx.IntImm) else None for s in shape]


def _moves_only_unit_axes(shape: list, axes: list[int]) -> bool:
    """A permutation that keeps the order of every axis not statically of size 1 is a reshape."""
    kept = [a for a in axes if shape[a] != 1]
    return kept == sorted(kept)


def channels_last(mod):
    """The module with NHWC between packed convs (see the module docstring)."""
    from tvm import ir, relax

    reduce_ops = {name: getattr(relax.op, name.split(".")[-1]) for name in REDUCE}

    @relax.expr_functor.mutator
    class _ChannelsLast(relax.PyExprMutator):
        def __init__(self, mod):
            super().__init__(mod)
            self.last = {}  # var of the original program -> new var holding its channels-last twin

        def twin(self, e):
            return self.last.get(e) if isinstance(e, relax.Var) else None

        def emit_as(self, binding, expr) -> None:
            """Bind `expr` in place of binding's value (an output var stays an output)."""
            bb = self.builder_
            new = bb.emit(expr) if isinstance(binding.var, relax.DataflowVar) else bb.emit_output(expr)
            self.set_var_remap(binding.var, new)

        def visit_var_binding_(self, binding):
            value, op = binding.value, _op(binding.value)
            if op == "relax.permute_dims":
                x = value.args[0]
                rank = len(_axes(value))
                if self.twin(x) is not None and _axes(value) == TO_LAST.get(rank):
                    self.set_var_remap(binding.var, self.twin(x))
                    return
                shape = _static_shape(x)
                if shape is not None and _moves_only_unit_axes(shape, _axes(value)):
                    self.emit_as(binding, relax.op.reshape(self.visit_expr(x), binding.var.ty.shape))
                else:
                    super().visit_var_binding_(binding)
                if _axes(value) == TO_FIRST.get(rank) and is_packed_call(self.lookup_binding(self.visit_expr(x))):
                    self.last[binding.var] = self.visit_expr(x)  # a conv's output: the twins start here
                return
            if op in REDUCE and self.twin(value.args[0]) is not None and self._spatial(value):
                x = self.twin(value.args[0])
                keep = bool(value.attrs.keepdims)
                y = self.builder_.emit(reduce_ops[op](x, axis=[1, 2], keepdims=keep))
                # (B, 1, 1, C) and (B, C, 1, 1) hold the same bytes
                self.emit_as(binding, relax.op.reshape(y, binding.var.ty.shape) if keep else y)
                return
            twin = self._twin_of(value, op)
            if twin is None:
                super().visit_var_binding_(binding)
                return
            # computed once, channels last; the channels-first value (kept only where an op
            # needs it) is a permute_dims of the twin
            self.last[binding.var] = self.builder_.emit(twin)
            self.emit_as(binding, relax.op.permute_dims(self.last[binding.var], TO_FIRST[binding.var.ty.ndim]))

        def _spatial(self, call) -> bool:
            """A reduction over exactly the two spatial axes of an NCHW tensor."""
            rank, axis = len(_static_shape(call.args[0]) or ()), call.attrs.axis
            return rank == 4 and axis is not None and sorted(int(a) % rank for a in axis) == [2, 3]

        def _twin_of(self, value, op):
            """The channels-last twin of a value computed by a layout-agnostic op, or None."""
            if op in UNARY and self.twin(value.args[0]) is not None:
                return relax.Call(value.op, [self.twin(value.args[0])] + [self.visit_expr(a) for a in value.args[1:]],
                                  value.attrs, value.ty_args)
            if op in BINARY and value.ty.ndim in TO_LAST:
                args = [self._last_operand(a, value.ty.ndim) for a in value.args]
                if any(a is None for a in args) or all(isinstance(a, ir.GenericConst) for a in args):
                    return None
                return relax.Call(value.op, args, value.attrs, value.ty_args)
            if op in POOLS and self.twin(value.args[0]) is not None and value.attrs.layout == "NCHW":
                a = value.attrs
                pool = relax.op.nn.max_pool2d if op == "relax.nn.max_pool2d" else relax.op.nn.avg_pool2d
                return pool(self.twin(value.args[0]), [int(v) for v in a.pool_size], [int(v) for v in a.strides],
                            [int(v) for v in a.padding], [int(v) for v in a.dilation], bool(a.ceil_mode),
                            bool(a.count_include_pad), layout="NHWC", out_layout="NHWC")
            return None

        def _last_operand(self, e, rank: int):
            """A binary op's operand channels last: its twin, or a constant moved to match
            (broadcast to the op's rank first, as numpy broadcasting reads it)."""
            if self.twin(e) is not None:
                return self.twin(e)
            if isinstance(e, ir.GenericConst):
                v = e.value.numpy()
                if v.ndim == 0:
                    return e
                if v.ndim > rank:
                    return None
                v = v.reshape((1,) * (rank - v.ndim) + v.shape).transpose(TO_LAST[rank])
                return relax.const(np.ascontiguousarray(v), str(v.dtype))
            return None

    # first: x = (pool, indices)[0] becomes x = pool, so the pooled value's twin is found
    mod = relax.transform.CanonicalizeBindings()(mod)
    fn = _ChannelsLast(mod)
    for gv, func in mod.functions_items():
        if isinstance(func, relax.Function):
            fn.builder_.update_func(gv, fn.visit_expr(func))
    return relax.transform.DeadCodeElimination()(fn.builder_.get())
