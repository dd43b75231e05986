"""Channels-last pass of the custom flavour: activations stay NHWC between compressed convs.

The packed conv kernels run fastest on NHWC (a 1x1 conv is then a GEMM on the pixels as they
lie, depthwise convs keep channels in vector lanes), but ONNX Conv semantics are NCHW. The pass:

1. sets channels_last=1 on every ai.spfq.PackedConv and wraps it as
   Transpose(to NHWC) -> PackedConv -> Transpose(to NCHW), keeping the original tensor names
   for the NCHW values (new NHWC tensors are named ``<tensor>:nhwc``);
2. moves each to-NCHW Transpose forward through layout-agnostic elementwise nodes (ReLU,
   Clip, HardSwish, SiLU's Sigmoid + Mul, the residual Add, PRelu with its slope permuted),
   when every other input is a constant or carries the same Transpose, and through 2-D
   MaxPool, which becomes the custom domain's channels-last MaxPool;
3. cancels Transpose pairs that compose to the identity, and drops nodes nothing reads.

What is left are transposes at the model's edges and around ops that need NCHW (average
pooling, Flatten, a float conv). Values are unchanged: only where the data lies moves.
"""

from __future__ import annotations

import heapq
from collections import defaultdict

import numpy as np
import onnx
from onnx import helper, numpy_helper

TO_LAST = {3: [0, 2, 1], 4: [0, 2, 3, 1]}  # rank -> perm NCHW -> NHWC
TO_FIRST = {3: [0, 2, 1], 4: [0, 3, 1, 2]}
UNARY = {"Relu", "Clip", "LeakyRelu", "Sigmoid", "Tanh", "HardSigmoid", "HardSwish", "Elu", "Selu", "Softplus",
         "Neg", "Abs", "Exp", "Erf", "Identity", "Mish", "Gelu"}
BINARY = {"Add", "Sub", "Mul", "Div", "Max", "Min", "PRelu", "Pow"}  # numpy-style broadcasting


def constants(g: onnx.GraphProto) -> dict:
    """{name: TensorProto} of the graph's initializers and Constant-node outputs."""
    consts = {i.name: i for i in g.initializer}
    for n in g.node:
        if n.op_type == "Constant" and n.attribute and n.attribute[0].name == "value":
            consts[n.output[0]] = n.attribute[0].t
    return consts


def channels_last(model: onnx.ModelProto, conv_op: str, domain: str) -> int:
    """Rewrite model.graph in place; returns how many Transpose nodes remain."""
    g = model.graph
    consts = constants(g)
    nodes = list(g.node)
    taken = {t for n in nodes for t in list(n.input) + list(n.output)} | {i.name for i in g.input}
    protected = {o.name for o in g.output}

    def fresh(base: str) -> str:
        name, i = f"{base}:nhwc", 1
        while name in taken:
            name, i = f"{base}:nhwc{i}", i + 1
        taken.add(name)
        return name

    def transpose(x: str, y: str, perm: list[int]) -> onnx.NodeProto:
        return helper.make_node("Transpose", [x], [y], name=f"{y}/Transpose", perm=perm)

    out: list[onnx.NodeProto] = []
    for n in nodes:
        if n.op_type != conv_op or n.domain != domain:
            out.append(n)
            continue
        rank = len(next(a.ints for a in n.attribute if a.name == "kernel_shape")) + 2
        kept = [a for a in n.attribute if a.name != "channels_last"]
        del n.attribute[:]
        n.attribute.extend(kept + [helper.make_attribute("channels_last", 1)])
        x_last, y_last, y = fresh(n.input[0]), fresh(n.output[0]), n.output[0]
        out.append(transpose(n.input[0], x_last, TO_LAST[rank]))
        n.input[0], n.output[0] = x_last, y_last
        out.append(n)
        out.append(transpose(y_last, y, TO_FIRST[rank]))
    nodes = out

    changed = True
    while changed:
        changed = False
        producer = {o: n for n in nodes for o in n.output}

        def perm_of(t: str) -> list[int] | None:
            p = producer.get(t)
            if p is not None and p.op_type == "Transpose":
                return list(next(a.ints for a in p.attribute if a.name == "perm"))
            return None

        for i, n in enumerate(nodes):
            if n.op_type == "Transpose" and n.output[0] not in protected:
                inner = perm_of(n.input[0])
                outer = list(next(a.ints for a in n.attribute if a.name == "perm"))
                if inner is not None and [inner[j] for j in outer] == list(range(len(outer))):
                    src = producer[n.input[0]].input[0]
                    _rename_uses(nodes, n.output[0], src)
                    del nodes[i]
                    changed = True
                    break
            if _nhwc_pool(n, perm_of, domain) and n.input[0] not in protected:
                y = n.output[0]
                y_last = fresh(y)
                attrs = [a for a in n.attribute if a.name in POOL_ATTRS]
                pool = helper.make_node("MaxPool", [producer[n.input[0]].input[0]], [y_last], name=n.name, domain=domain)
                pool.attribute.extend(attrs)
                nodes[i:i + 1] = [pool, transpose(y_last, y, TO_FIRST[4])]
                changed = True
                break
            if n.domain or n.op_type not in UNARY | BINARY or len(n.output) != 1:
                continue
            data = [t for t in n.input if t and t not in consts]
            perms = [perm_of(t) for t in data]
            if not data or any(p is None or p != perms[0] for p in perms) or perms[0] not in TO_FIRST.values():
                continue
            perm = perms[0]
            if n.op_type in UNARY and n.input[0] not in data:
                continue
            new_inputs = []
            for t in n.input:
                if not t:
                    new_inputs.append(t)
                elif t in consts:
                    new_inputs.append(_permuted_const(g, consts, t, perm, n.op_type in BINARY, fresh))
                else:
                    new_inputs.append(producer[t].input[0])
            if any(t is None for t in new_inputs):
                continue
            y = n.output[0]
            y_last = fresh(y)
            moved = helper.make_node(n.op_type, new_inputs, [y_last], name=n.name, domain=n.domain or None)
            moved.attribute.extend(n.attribute)
            nodes[i:i + 1] = [moved, transpose(y_last, y, perm)]
            changed = True
            break
    nodes = _live(nodes, protected)
    nodes = _topological(nodes, {i.name for i in g.input} | set(consts))
    del g.node[:]
    g.node.extend(nodes)
    present = {t for n in nodes for t in n.output}
    kept = [v for v in g.value_info if v.name in present]
    del g.value_info[:]
    g.value_info.extend(kept)
    used = {t for n in nodes for t in n.input}
    keep_inits = [i for i in g.initializer if i.name in used]
    del g.initializer[:]
    g.initializer.extend(keep_inits)
    return sum(n.op_type == "Transpose" for n in nodes)


POOL_ATTRS = ("kernel_shape", "strides", "pads", "dilations")


def _nhwc_pool(n: onnx.NodeProto, perm_of, domain: str) -> bool:
    """A 2-D ONNX MaxPool (floor mode, explicit pads, no indices) reading a to-NCHW Transpose:
    it becomes the custom domain's channels-last MaxPool (kernels/ort/spfq_ort_ops.cc)."""
    if n.op_type != "MaxPool" or n.domain or len(n.output) != 1 or perm_of(n.input[0]) != TO_FIRST[4]:
        return False
    a = {x.name: helper.get_attribute_value(x) for x in n.attribute}
    auto = a.get("auto_pad", b"NOTSET")
    return len(a.get("kernel_shape", [])) == 2 and not a.get("ceil_mode", 0) and auto in (b"NOTSET", "NOTSET")


def _permuted_const(g, consts, name: str, perm: list[int], broadcast: bool, fresh) -> str | None:
    """The constant input `name` of an elementwise node moved behind a Transpose(perm): scalars
    as they are; broadcasting constants permuted by perm's inverse; None if impossible."""
    arr = numpy_helper.to_array(consts[name])
    if arr.size == 1 or not broadcast:
        return name if arr.size == 1 else None
    if arr.ndim > len(perm):
        return None
    full = arr.reshape((1,) * (len(perm) - arr.ndim) + arr.shape)
    moved = np.ascontiguousarray(np.transpose(full, np.argsort(perm)))
    new = fresh(name)
    g.initializer.append(numpy_helper.from_array(moved, new))
    consts[new] = g.initializer[-1]
    return new


def _rename_uses(nodes, old: str, new: str) -> None:
    for n in nodes:
        for j, t in enumerate(n.input):
            if t == old:
                n.input[j] = new


def _live(nodes, protected: set[str]) -> list:
    """Nodes whose outputs something reads (transitively from the graph outputs)."""
    producer = {o: n for n in nodes for o in n.output}
    need, stack, seen = set(), list(protected), set()
    while stack:
        t = stack.pop()
        p = producer.get(t)
        if p is None or id(p) in seen:
            continue
        seen.add(id(p))
        need.add(id(p))
        stack.extend(x for x in p.input if x)
    return [n for n in nodes if id(n) in need]


def _topological(nodes, available: set[str]) -> list:
    """Nodes in an order where each follows the producers of its inputs (stable otherwise)."""
    produced = {o for n in nodes for o in n.output}
    ready, out = set(available), []
    waiting = defaultdict(list)
    pending = {}

    def missing(n):
        return {t for t in n.input if t and t in produced and t not in ready}

    queue: list[int] = []
    for idx, n in enumerate(nodes):
        m = missing(n)
        pending[idx] = m
        if m:
            for t in m:
                waiting[t].append(idx)
        else:
            queue.append(idx)
    heapq.heapify(queue)
    while queue:
        idx = heapq.heappop(queue)
        n = nodes[idx]
        out.append(n)
        for t in n.output:
            ready.add(t)
            for w in waiting.pop(t, []):
                pending[w].discard(t)
                if not pending[w]:
                    heapq.heappush(queue, w)
    return out
