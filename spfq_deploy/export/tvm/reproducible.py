"""Same .spfq, same library bytes: the one source of run-to-run difference TVM 0.27 leaves in a
compiled model, and its fix.

Relax's VMShapeLower turns the symbolic-shape arithmetic of a function (e.g. `s77 * 25088`, the
flattened size after a conv) into host TIR functions `shape_func*` that read the symbolic
variables from the VM's shape heap and store each derived value in its own heap slot:

    H[6] = 40 * H[0];  H[5] = 512 * H[0];  H[2] = 25088 * H[0];  ...

The slots are numbered deterministically, but the ORDER of those stores comes from iterating a
std::unordered_map keyed by structural hash, and the hash of a free TIR variable is its object
address: the order (and so the machine code of shape_func, a few dozen bytes of .text) changes
from process to process with the heap layout (ASLR), whatever PYTHONHASHSEED says.

`canonical_shape_funcs` is a module pass run right after Relax's default pipeline: in every
shape function whose body is a plain sequence of stores into the heap at constant slots, reading
only slots that no store of the same function writes (what VMShapeLower emits: each store depends
only on already matched variables), the stores are independent, so they are sorted by slot
index. Anything of another shape is left exactly as TVM made it (tests/test_tvm_integrity.py
then reports the export as not reproducible instead of this pass reordering a dependency).
"""

from __future__ import annotations

SHAPE_FUNC_PREFIX = "shape_func"


def _const(e) -> int | None:
    from tvm import tirx

    return int(e.value) if isinstance(e, tirx.IntImm) else None


def _load_type():
    import tvm

    return getattr(tvm.ir, "TensorLoad", None) or tvm.tirx.BufferLoad


def _reads(e, buf, out: set) -> bool:
    """Add the constant heap slots `e` loads from `buf` to `out`; False for an expression of a
    kind this pass does not know (then the function is left alone)."""
    from tvm import tirx

    _LOAD = _load_type()
    if isinstance(e, (tirx.IntImm, tirx.FloatImm, tirx.Var)):
        return True
    if isinstance(e, _LOAD):  # TVM 0.27: tirx.BufferLoad(...) builds an ir.TensorLoad (its buffer: .source)
        src = e.source if hasattr(e, "source") else getattr(e, "buffer", None)
        if src is None or not src.same_as(buf) or len(e.indices) != 1 or _const(e.indices[0]) is None:
            return False
        out.add(_const(e.indices[0]))
        return True
    binary = (tirx.Add, tirx.Sub, tirx.Mul, tirx.Div, tirx.Mod, tirx.FloorDiv, tirx.FloorMod, tirx.Min,
              tirx.Max, tirx.EQ, tirx.NE, tirx.LT, tirx.LE, tirx.GT, tirx.GE, tirx.And, tirx.Or)
    if isinstance(e, binary):
        return _reads(e.a, buf, out) and _reads(e.b, buf, out)
    if isinstance(e, tirx.Not):
        return _reads(e.a, buf, out)
    if isinstance(e, tirx.Cast):
        return _reads(e.value, buf, out)
    if isinstance(e, tirx.Select):
        return all(_reads(x, buf, out) for x in (e.condition, e.true_value, e.false_value))
    return False


def sorted_stores(func):
    """The shape function with its independent heap stores sorted by slot, or None when its body
    is not such a sequence (or is already in order)."""
    from tvm import tirx

    body = func.body
    if not isinstance(body, tirx.SeqStmt) or len(func.params) != 1:
        return None
    stmts = list(body.seq)
    if not stmts or not all(isinstance(s, tirx.BufferStore) for s in stmts):
        return None
    buf = stmts[0].buffer
    slots, reads = [], set()
    for s in stmts:
        if not s.buffer.same_as(buf) or len(s.indices) != 1 or _const(s.indices[0]) is None:
            return None
        if not _reads(s.value, buf, reads):
            return None
        slots.append(_const(s.indices[0]))
    if len(set(slots)) != len(slots) or reads & set(slots):
        return None  # a store feeds another one: their order matters, keep TVM's
    order = sorted(range(len(stmts)), key=lambda i: slots[i])
    if order == list(range(len(stmts))):
        return None
    return func.with_body(tirx.SeqStmt([stmts[i] for i in order]))


def canonical_shape_funcs():
    """Module pass: every `shape_func*` PrimFunc's independent stores in slot order."""
    import tvm
    from tvm import tirx

    @tvm.transform.module_pass(opt_level=0, name="SpfqCanonicalShapeFuncs")
    def _pass(mod, _ctx):
        updates = {}
        for gvar, func in mod.functions.items():
            if isinstance(func, tirx.PrimFunc) and gvar.name_hint.startswith(SHAPE_FUNC_PREFIX):
                new = sorted_stores(func)
                if new is not None:
                    updates[gvar] = new
        if updates:
            mod = mod.clone()  # the pass's input stays as it was
            for gvar in sorted(updates, key=lambda g: g.name_hint):
                mod.update_func(gvar, updates[gvar])
        return mod

    return _pass
