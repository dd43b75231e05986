"""The compressed model as a Relax module whose compressed layers call the packed kernels.

torch.export traces the reference model with every compressed layer replaced by the marker op
`spfq::packed_layer(x, index, geometry)` (a torch.library custom op: its fake implementation
gives the output shape, so dynamic batch / sequence / spatial axes stay symbolic). TVM's
from_exported_program imports everything else (attention, LayerNorm, GELU, pooling) as Relax
ops, and our custom_convert_map turns each marker into

    R.call_dps_packed("spfq_packed_layer", (x, attrs, sign, mask, planes, scale, lam, bias))

with the kernel-ABI packed buffers (the same bytes as the ONNX custom-op flavour) as Relax
constants. No float weight of a compressed layer enters the module. A conv call takes and
gives channels-last tensors (the layout the kernels run fastest on), wrapped in permute_dims
from and back to PyTorch's channels-first; layout.py then cancels those pairs between convs.
"""

from __future__ import annotations

import contextlib
import copy
import threading
import warnings
from dataclasses import dataclass, field

import numpy as np
import torch
from torch import nn

from ...compress.capture import conv_output_size, conv_params
from ...compressed import CompressedLayer, CompressedModel
from ...errors import SpfqError
from ...kernels import LAYOUT_IDS, kernel_pack, layer_activation, preferred_layout
from ...reference import replace_module
from ..source import ExportInputs

PACKED_FUNC = "spfq_packed_layer"  # kernels/tvm/spfq_tvm_ops.cc exports __tvm_ffi_spfq_packed_layer
ATTR_VERSION = 3  # 2: conv tensors channels last; clip_lo / clip_hi (an output clamp fused in); 3: group_size
# the attrs vector of kernels/tvm/spfq_tvm_ops.cc (enum Attr), in order
ATTR_FIELDS = ("version", "layout", "bits", "k", "n", "kept_words", "int8", "has_lam", "has_bias", "conv_dims",
               "groups", "kh", "kw", "sh", "sw", "pt", "pl", "pb", "pr", "dh", "dw", "clip_lo", "clip_hi", "group_size")
TO_LAST = {3: [0, 2, 1], 4: [0, 2, 3, 1]}  # rank -> permute_dims axes channels-first -> channels-last
TO_FIRST = {3: [0, 2, 1], 4: [0, 3, 1, 2]}


def is_packed_call(e) -> bool:
    """Whether a Relax expression is a call of the packed function."""
    from tvm import ir, relax

    return (isinstance(e, relax.Call) and isinstance(e.op, ir.Op) and e.op.name == "relax.call_dps_packed"
            and isinstance(e.args[0], relax.ExternFunc) and e.args[0].global_symbol == PACKED_FUNC)


def float_bits(v: float) -> int:
    """A float32 as the int64 attrs carry it (its IEEE bit pattern): clip_lo / clip_hi."""
    return int(np.array(v, np.float32).view(np.uint32))


def with_clip(attrs: np.ndarray, lo: float, hi: float) -> np.ndarray:
    """A copy of a layer's attrs with the output clamp [lo, hi] (fuse.py)."""
    out = attrs.copy()
    out[ATTR_FIELDS.index("clip_lo")], out[ATTR_FIELDS.index("clip_hi")] = float_bits(lo), float_bits(hi)
    return out


# ------------------------------------------------------------------ the marker op

@torch.library.custom_op("spfq::packed_layer", mutates_args=())
def packed_layer(x: torch.Tensor, index: int, geometry: list[int]) -> torch.Tensor:
    """Stands for compressed layer `index` while tracing; never computed eagerly.
    geometry: [out_features] (linear) or [out_features, k..., stride..., padding..., dilation...]."""
    raise RuntimeError("spfq::packed_layer only marks a layer for the TVM export; it has no eager kernel")


@packed_layer.register_fake
def _(x, index, geometry):
    return x.new_empty(_out_shape(list(x.shape), geometry))


def _out_shape(shape: list, geometry: list[int]) -> list:
    n = geometry[0]
    if len(geometry) == 1:
        return shape[:-1] + [n]
    d = (len(geometry) - 1) // 4
    k, s, p, dil = (geometry[1 + i * d:1 + (i + 1) * d] for i in range(4))
    return [shape[0], n] + [conv_output_size(shape[2 + i], k[i], s[i], p[i], dil[i]) for i in range(d)]


def geometry(layer: CompressedLayer) -> list[int]:
    if layer.kind == "linear":
        return [layer.rows]
    c = layer.conv
    return [layer.rows, *c["kernel_size"], *c["stride"], *c["padding"], *c["dilation"]]


class _Marked(nn.Module):
    def __init__(self, index: int, geom: list[int]):
        super().__init__()
        self.index, self.geom = index, geom

    def forward(self, x):
        return torch.ops.spfq.packed_layer(x, self.index, self.geom)


# ------------------------------------------------------------------ per-layer kernel inputs

@dataclass
class PackedLayer:
    """Everything the packed function gets for one layer, as numpy arrays."""

    name: str
    attrs: np.ndarray  # int64 (len(ATTR_FIELDS),)
    buffers: dict  # sign, mask, planes (uint64), scale, lam, bias (float32); placeholders when absent
    info: dict = field(default_factory=dict)


def pack_for_kernel(layer: CompressedLayer, activation: str) -> PackedLayer:
    """The kernel-ABI buffers and attributes of one layer (layout choice as the ONNX custom ops);
    a layer with group-wise scales: group_size and scale / lam (N, ceil(K / G))."""
    layout, bits, bufs = kernel_pack(layer, preferred_layout(layer), groups_ok=True)
    empty_u64, empty_f32 = np.zeros(1, np.uint64), np.zeros(1, np.float32)
    planes_key = "kept" if layout == "sparse" else "planes"
    use_lam = layer.lam is not None and layout in ("planes", "sparse")
    out = {"sign": bufs["sign"].astype(np.uint64) if "sign" in bufs else empty_u64,
           "mask": bufs["mask"].astype(np.uint64) if "mask" in bufs else empty_u64,
           "planes": bufs[planes_key].astype(np.uint64) if planes_key in bufs else empty_u64,
           "scale": layer.scale.astype(np.float32),
           "lam": layer.lam.astype(np.float32) if use_lam else empty_f32,
           "bias": np.asarray(layer.bias, np.float32) if layer.bias is not None else empty_f32}
    # a zero-element constant does not survive TVM's constant serialisation (an all-zero sparse
    # layer has kept_words = 0): pass the placeholder; the kernel reads no kept word then
    out = {k: (v if v.size else (empty_u64 if v.dtype == np.uint64 else empty_f32)) for k, v in out.items()}
    a = dict.fromkeys(ATTR_FIELDS, 0)
    a.update(version=ATTR_VERSION, layout=LAYOUT_IDS[layout], bits=bits, k=layer.cols, n=layer.rows,
             kept_words=int(bufs["kept"].shape[2]) if layout == "sparse" else 0, int8=int(activation == "int8"),
             has_lam=int(use_lam), has_bias=int(layer.bias is not None),
             clip_lo=float_bits(-np.inf), clip_hi=float_bits(np.inf), group_size=layer.group_size)
    if layer.kind != "linear":
        c = layer.conv
        two = layer.kind == "conv2d"
        k, s, p, d = c["kernel_size"], c["stride"], c["padding"], c["dilation"]
        a.update(conv_dims=2 if two else 1, groups=int(c["groups"]),
                 kh=k[0] if two else 1, kw=k[-1], sh=s[0] if two else 1, sw=s[-1],
                 pt=p[0] if two else 0, pb=p[0] if two else 0, pl=p[-1], pr=p[-1],
                 dh=d[0] if two else 1, dw=d[-1])
    attrs = np.array([a[f] for f in ATTR_FIELDS], np.int64)
    packed_bytes = int(sum(b.nbytes for b in bufs.values()))
    return PackedLayer(layer.name, attrs, out, {"call": PACKED_FUNC, "layout": layout, "bits": bits,
                                                "activation": activation, "packed_bytes": packed_bytes})


# ------------------------------------------------------------------ torch.export -> Relax

_EXPORT_LOCK = threading.Lock()  # torch.export and the importer are not re-entrant per process


def _dynamic_shapes(inputs: ExportInputs, model: nn.Module):
    """torch.export dynamic_shapes from the model file's dynamic axes: Dim.AUTO per named axis,
    so torch derives the ranges (e.g. conv inputs >= the kernel) and relations between inputs
    itself; an axis the model pins to one size is specialised (the IR then shows a constant).
    The specs follow forward's signature: the tensors a `*past` parameter takes (a decoder's
    cache) form one tuple there."""
    import inspect

    from torch.export import Dim

    spec = []
    for name, arg in zip(inputs.input_names, inputs.args):
        axes = inputs.dynamic_axes.get(name, {})
        spec.append({int(axis): Dim.AUTO for axis in axes} or None)
    if not any(s is not None for s in spec):
        return None
    params = list(inspect.signature(model.forward).parameters.values())
    star = next((i for i, p in enumerate(params) if p.kind is inspect.Parameter.VAR_POSITIONAL), None)
    if star is not None and star <= len(spec):
        spec = spec[:star] + [tuple(spec[star:])]
    return tuple(spec)


@contextlib.contextmanager
def _no_guard_module():
    """The importer's run_decompositions re-runs the program through its `_guards_fn` module,
    whose generated shape checks fail on a decoder's cache inputs (torch 2.13: 'NoneType' has no
    attribute 'size'); torch's own switch (used for executorch and torchao) leaves that module
    out. The shapes are still checked by the compiled Relax function at run time."""
    from torch.export import _unlift

    original = _unlift._ok_to_generate_guards_fn
    _unlift._ok_to_generate_guards_fn = lambda: False
    try:
        yield
    finally:
        _unlift._ok_to_generate_guards_fn = original


def dynamic_inputs(ep, input_names: list[str]) -> dict:
    """{input name: [axis, ...]} of the exported program's symbolic input axes (user inputs in
    argument order, named as the model file names them)."""
    user = list(ep.graph_signature.user_inputs)
    nodes = {n.name: n for n in ep.graph.nodes if n.op == "placeholder"}
    out = {}
    for label, placeholder in zip(input_names, user):
        val = nodes[placeholder].meta.get("val") if placeholder in nodes else None
        axes = [i for i, s in enumerate(getattr(val, "shape", ())) if not isinstance(s, int)]
        if axes:
            out[label] = axes
    return out


_KINDS = {"linear": nn.Linear, "conv1d": nn.Conv1d, "conv2d": nn.Conv2d}
_GEOMETRY = ("kernel_size", "stride", "padding", "dilation", "groups")


def check_module(name: str, module: nn.Module, layer: CompressedLayer) -> None:
    """The model's module must compute what the packed kernel computes for the file's layer:
    the same op (Linear / Conv1d / Conv2d; not transposed) with zero padding and the file's conv
    geometry. Anything else would be replaced silently by a different op: one-line error."""
    want = _KINDS.get(layer.kind)
    if want is None:
        raise SpfqError(f"layer '{name}': the file's layer kind {layer.kind!r} has no packed kernel "
                        f"(the kernels run {', '.join(_KINDS)})")
    if not isinstance(module, want) or isinstance(module, nn.modules.conv._ConvTransposeNd):
        raise SpfqError(f"layer '{name}' is a {type(module).__name__} in the model but {layer.kind} in the file; "
                        f"the packed kernels run only nn.Linear / nn.Conv1d / nn.Conv2d")
    if layer.kind == "linear":
        return
    if module.padding_mode != "zeros":
        raise SpfqError(f"layer '{name}': padding_mode={module.padding_mode!r} has no packed kernel (only zeros)")
    if isinstance(module.padding, str) and module.padding == "same" and any(k % 2 == 0 for k in module.kernel_size):
        raise SpfqError(f"layer '{name}': padding='same' with an even kernel has no packed kernel")
    have = conv_params(module)
    for key in _GEOMETRY:
        a, b = have[key], layer.conv.get(key)
        if b is not None and (list(a) if isinstance(a, (list, tuple)) else a) != (list(b) if isinstance(b, (list, tuple)) else b):
            raise SpfqError(f"layer '{name}': {key} is {a} in the model but {b} in the file")


def marked_model(model: nn.Module, cm: CompressedModel) -> tuple[nn.Module, list[str]]:
    """A copy of `model` with every compressed layer replaced by the marker; layer order."""
    model = copy.deepcopy(model).eval()
    names = list(cm.layers)
    for i, name in enumerate(names):
        try:
            module = model.get_submodule(name)
        except AttributeError:
            raise SpfqError(f"compressed layer '{name}' is not a module of the model") from None
        check_module(name, module, cm.layers[name])
        replace_module(model, name, _Marked(i, geometry(cm.layers[name])))
    return model, names


def export_program(model: nn.Module, cm: CompressedModel, inputs: ExportInputs, dynamic: bool = True):
    """torch.export of the marked model (dynamic axes from the model file when `dynamic`)."""
    marked, names = marked_model(model, cm)
    dyn = _dynamic_shapes(inputs, marked) if dynamic else None
    try:
        with torch.no_grad(), warnings.catch_warnings():
            # torch 2.13's own pytree deprecation, printed once per process: noise on the CLI
            warnings.filterwarnings("ignore", message=r".*treespec, LeafSpec", category=FutureWarning)
            ep = torch.export.export(marked, tuple(inputs.args), dynamic_shapes=dyn, strict=False)
    except Exception as exc:  # torch raises many types; the first line says what failed
        raise SpfqError(f"torch.export of the model failed: {str(exc).strip().splitlines()[0]}") from None
    seen = {n.args[1] for n in ep.graph.nodes if n.op == "call_function" and "packed_layer" in str(n.target)}
    lost = [names[i] for i in range(len(names)) if i not in seen]
    if lost:
        raise SpfqError(f"compressed layer '{lost[0]}' is not on the model's forward path; cannot export it")
    return ep, names


def to_relax(ep, cm: CompressedModel, names: list[str], activation: str):
    """The Relax module of an exported program; returns (IRModule, per-layer info)."""
    from tvm import relax
    from tvm import tirx as tir
    from tvm.relax.frontend.torch import from_exported_program

    packed = [pack_for_kernel(cm.layers[n], layer_activation(cm.layers[n], activation)) for n in names]

    def convert(node, importer):
        x = importer.env[node.args[0]]
        index, geom = int(node.args[1]), list(node.args[2])
        p = packed[index]
        shape = list(x.ty.shape.values)
        out_shape = _relax_out_shape(shape, geom, tir)
        bb, rank = importer.block_builder, len(shape)
        conv = len(geom) > 1
        if conv:  # the kernel's channels-last tensors
            x = bb.emit(relax.op.permute_dims(x, TO_LAST[rank]))
            out_shape = [out_shape[i] for i in TO_LAST[rank]]
        # explicit dtypes: relax.const would narrow int64 to int32
        args = [x, relax.const(p.attrs, "int64")] + [relax.const(p.buffers[k], str(p.buffers[k].dtype)) for k in
                                                      ("sign", "mask", "planes", "scale", "lam", "bias")]
        y = bb.emit(relax.call_dps_packed(PACKED_FUNC, args, relax.TensorType(out_shape, "float32")))
        return bb.emit(relax.op.permute_dims(y, TO_FIRST[rank])) if conv else y

    try:
        with warnings.catch_warnings(), _no_guard_module():
            warnings.filterwarnings("ignore", message=r".*treespec, LeafSpec", category=FutureWarning)
            mod = from_exported_program(ep, custom_convert_map={"packed_layer.default": convert})
    except AssertionError as exc:  # the importer asserts on unsupported torch ops
        raise SpfqError(f"TVM's torch importer cannot translate the model: {exc}") from None
    return mod, {p.name: p.info for p in packed}


def _relax_out_shape(shape: list, geom: list[int], tir) -> list:
    n = geom[0]
    if len(geom) == 1:
        return shape[:-1] + [n]
    d = (len(geom) - 1) // 4
    k, s, p, dil = (geom[1 + i * d:1 + (i + 1) * d] for i in range(4))
    out = [shape[0], n]
    for i in range(d):
        size = shape[2 + i]
        if isinstance(size, tir.IntImm):
            out.append(conv_output_size(int(size), k[i], s[i], p[i], dil[i]))
        else:
            out.append(tir.floordiv(size + 2 * p[i] - dil[i] * (k[i] - 1) - 1, s[i]) + 1)
    return out
