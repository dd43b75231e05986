"""`spfq-deploy validate OUT_DIR`: every artifact of an export folder against its reference.

Reference: the dequantised PyTorch model rebuilt from OUT/model.spfq (float artifacts), or the
integer reference (spfq_deploy.reference.int8_activation_reference) for artifacts built with
int8 activations. Same inputs for both: OUT/inputs.npz or a --data .npz with the same names.
Rules: tolerances.TOLERANCES. First diverging layer: layers.py. Weights of the ONNX flavours
decoded and compared exactly with model.spfq: weights.py.

Manifests: each one's "format" must be the one its file name stands for and its
"format_version" one this code reads (FORMAT_VERSION); anything else, or a manifest that is not
a JSON object, stops validation (SpfqError, exit 2): rows built from a misread manifest would
mean nothing.
"""

from __future__ import annotations

import json
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..errors import SpfqError
from ..export.source import file_sha256
from ..targets import HOST
from . import decode, metrics, runners
from . import layers as layer_checks
from . import weights as weight_checks
from .tolerances import TOLERANCES, failures

MANIFESTS = ("manifest.json", "manifest.tvm.json", "manifest.cuda.json")
FORMATS = {"manifest.json": "spfq-deploy/onnx-export", "manifest.tvm.json": "spfq-deploy/tvm-export",
           "manifest.cuda.json": "spfq-deploy/cuda-export"}
FORMAT_VERSION = 1  # the newest manifest format_version this validate reads
_OBJECT_FIELDS = ("files", "inputs", "artifacts", "custom_op_library", "skipped", "layers", "libraries", "library",
                  "source")


def _kind(v) -> str:
    return {dict: "object", list: "list", str: "string", bool: "boolean", type(None): "null"}.get(
        type(v), "number")


def _read_manifest(path: Path) -> dict | None:
    """The manifest, None when the folder has none; SpfqError for one validate cannot trust."""
    if not path.is_file():
        return None
    try:
        doc = json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SpfqError(f"{path}: not a readable manifest ({str(exc).splitlines()[0]})") from None
    if not isinstance(doc, dict):
        raise SpfqError(f"{path}: not an spfq-deploy manifest (the JSON is a {_kind(doc)}, not an object)")
    want, fmt, version = FORMATS[path.name], doc.get("format"), doc.get("format_version")
    if fmt != want:
        raise SpfqError(f"{path}: format {fmt!r}, expected {want!r} (not an export this spfq-deploy validates)")
    if isinstance(version, bool) or not isinstance(version, int) or version < 1:
        raise SpfqError(f"{path}: format_version {version!r} is not a version number")
    if version > FORMAT_VERSION:
        raise SpfqError(f"{path}: format_version {version} is newer than this spfq-deploy reads "
                        f"({FORMAT_VERSION}): validate it with the spfq-deploy that exported it, or update")
    for key in _OBJECT_FIELDS:
        if key in doc and not isinstance(doc[key], dict):
            raise SpfqError(f"{path}: {key!r} is a {_kind(doc[key])}, not an object (a damaged manifest)")
    bad = next((k for k, v in doc.get("files", {}).items() if not isinstance(v, dict)), None)
    if bad is not None:
        raise SpfqError(f"{path}: the files entry of {bad!r} is not an object (a damaged manifest)")
    return doc


def _load_data(path: Path, names: list[str]) -> dict:
    if not path.is_file():
        raise SpfqError(f"{path}: no such data file")
    try:
        with np.load(path, allow_pickle=False) as z:
            data = {k: np.asarray(z[k]) for k in z.files}
    except Exception as exc:
        raise SpfqError(f"{path}: not a readable .npz file ({str(exc).splitlines()[0]})") from None
    if names and set(data) != set(names):
        raise SpfqError(f"{path}: holds inputs {sorted(data)}, the model takes {names}")
    return {n: data[n] for n in (names or list(data))}


def _flat(y) -> list[np.ndarray]:
    if torch.is_tensor(y):
        return [y.detach().float().numpy()]
    if isinstance(y, dict):
        y = list(y.values())
    out = []
    for v in y:
        out.extend(_flat(v))
    return out


def _one_line(exc: BaseException) -> str:
    text = str(exc).strip().splitlines()
    return f"{type(exc).__name__}: {text[0] if text else ''}"[:400] if not isinstance(exc, SpfqError) else text[0]


class _References:
    """The reference outputs (and per-layer outputs) for the float / int8 references, computed once."""

    def __init__(self, out: Path, spec: str | None, feeds: dict, layer_names: list[str], rule: int = 2):
        from ..pack import container
        from ..reference import load_reference

        self.cm = container.load(out / "model.spfq")
        self.model = load_reference(out / "model.spfq", spec)
        self.args = [torch.from_numpy(v) for v in feeds.values()]
        self.layer_names = layer_names
        self.rule = rule  # the artifacts' int8 quantiser (reference.quantize_rows_i8)
        self._cache, self._int8 = {}, {}
        self._int8_layers = {}
        self._decode = {}

    @staticmethod
    def _key(kind: str, float_layers: frozenset) -> tuple:
        """One reference per kind; the int8 one per set of weight-only layers."""
        return kind, float_layers if kind != "float" else frozenset()

    def greedy(self, kind: str, float_layers: frozenset, ids: list[int]) -> tuple[list, list]:
        """The reference's greedy decoding after ids (validate.decode), computed once per reference."""
        key = self._key(kind, float_layers)
        if key not in self._decode:
            self._decode[key] = decode.reference(self.module(*key), ids)
        return self._decode[key]

    def module(self, kind: str, float_layers: frozenset = frozenset()):
        """float_layers: the layers an int8 artifact runs weight-only (dequantised modules)."""
        if kind == "float":
            return self.model
        if float_layers not in self._int8:
            from ..reference import int8_activation_reference

            self._int8[float_layers] = int8_activation_reference(self.model, self.cm, float_layers, self.rule)
        return self._int8[float_layers]

    def outputs(self, kind: str, float_layers: frozenset = frozenset()) -> tuple[list, dict]:
        key = self._key(kind, float_layers)
        if key not in self._cache:
            y, hooked = layer_checks.hooked_outputs(self.module(*key), self.args, self.layer_names)
            self._cache[key] = (_flat(y), hooked)
        return self._cache[key]

    def layer(self, kind: str, name: str, float_layers: frozenset = frozenset()):
        if kind == "float" or name in float_layers:
            return self.model.get_submodule(name)
        from ..reference import Int8ActivationLayer

        if name not in self._int8_layers:
            self._int8_layers[name] = Int8ActivationLayer(self.cm.layers[name], self.rule)
        return self._int8_layers[name]


def _checksum(out: Path, rel: str, files: dict) -> str | None:
    """None when the file matches the manifest's sha256, else why not."""
    path = out / rel
    if not path.is_file():
        return f"{rel} is missing"
    entry = files.get(rel)
    if entry is None:
        return f"{rel} has no checksum in the manifest"
    if file_sha256(path) != entry.get("sha256"):
        size = entry.get("bytes")
        size = f"{size:,}" if isinstance(size, int) and not isinstance(size, bool) else "?"
        return f"{rel}: sha256 differs from the manifest ({path.stat().st_size:,} bytes, manifest {size})"
    return None


def validate(out_dir: str | Path, targets: list[str] | None = None, data: str | Path | None = None,
             log=print) -> dict:
    """The report (rows, summary); raises SpfqError for a folder it cannot validate at all."""
    out = Path(out_dir)
    if not out.is_dir():
        raise SpfqError(f"{out}: no such export folder")
    onnx_m, tvm_m, cuda_m = (_read_manifest(out / m) for m in MANIFESTS)
    if onnx_m is None and tvm_m is None and cuda_m is None:
        raise SpfqError(f"{out}: no {', '.join(MANIFESTS)} (not an spfq-deploy export folder)")
    first = onnx_m or tvm_m or cuda_m
    manifests = {"onnx": onnx_m, "tvm": tvm_m, "cuda": cuda_m}
    if not (out / "model.spfq").is_file():
        raise SpfqError(f"{out}: model.spfq is missing (the reference is rebuilt from it)")
    names = list(first.get("inputs", {}).get("names", []))
    out_names = list(first.get("inputs", {}).get("outputs", []))
    data_path = Path(data) if data else out / "inputs.npz"
    feeds = _load_data(data_path, names)
    layer_names = list((first.get("layers") or {}).keys())
    spec = (first.get("source") or {}).get("model_spec")
    try:
        refs = _References(out, spec, feeds, layer_names, int(first.get("int8_quantizer", 1)))
    except SpfqError:
        raise
    except Exception as exc:
        raise SpfqError(f"{out / 'model.spfq'}: cannot rebuild the reference ({_one_line(exc)})") from None
    layer_names = [n for n in layer_names if n in refs.cm.layers] or list(refs.cm.layers)
    refs.layer_names = layer_names

    arts = runners.discover(out, onnx_m, tvm_m, HOST, cuda_m)
    wanted = set(targets) if targets else None
    if wanted:
        arts = [a for a in arts if a.target in wanted]
    rows = []
    qemu = [a for a in arts if a.flavour == "tvm" and a.runner == "qemu" and not a.skip]
    qemu_results = {}
    if qemu:
        log(f"running {len(qemu)} aarch64 librar{'y' if len(qemu) == 1 else 'ies'} under qemu-aarch64 "
            "(import tvm alone takes 10-20 s there) ...")
        qemu_results = runners.run_tvm_qemu(out, qemu, (tvm_m.get("inputs") or {}).get("names", names), feeds,
                                            tvm_m.get("files", {}), "manifest.tvm.json")
    # model.spfq is the reference and what the weights are compared with: it must be the exported one
    spfq_changed = next((f"{why} ({name}; the reference and the weight check are built from it)"
                         for name, m in zip(MANIFESTS, (onnx_m, tvm_m, cuda_m))
                         if m is not None and "model.spfq" in m.get("files", {})
                         for why in [_checksum(out, "model.spfq", m["files"])] if why), None)
    shared = {"weights": {}, "spfq_changed": spfq_changed, "decode_prompt": decode.prompt(out, names, feeds)}
    for art in arts:
        rows.append(_validate_one(out, art, manifests, feeds, refs, out_names, qemu_results, shared))
    for t in sorted(wanted or ()):
        if t != "cuda" and not any(a.target == t for a in arts):
            rows.append(_skip_row("(any)", t, f"no artifact for target {t} in {out}"))
    if (wanted is None or "cuda" in wanted) and not any(a.flavour == "cuda" for a in arts):
        rows.append(_skip_row("(cuda)", "cuda", "the export holds no CUDA artifact (export with --target cuda)"))
    summary = {s: sum(r["status"] == s for r in rows) for s in ("ok", "fail", "skip", "info")}
    return {"folder": str(out), "data": str(data_path), "samples": int(len(next(iter(feeds.values())))),
            "host": HOST, "tolerances": {k: v.as_dict() for k, v in TOLERANCES.items()},
            "rows": rows, "summary": summary, "passed": summary["fail"] == 0}


def _skip_row(artifact: str, target: str, why: str) -> dict:
    return {"artifact": artifact, "file": None, "target": target, "status": "skip", "note": why,
            "metrics": None, "latency_ms": None}


WEIGHTS_NOT_CHECKED = {
    "tvm": "not decoded: the weights are compiled into the TVM library (checked by its sha256 and the numbers)",
    "cuda": "the CUDA library uploads model.spfq itself (no copy of the weights to decode); its sha256 is "
            "checked against manifest.cuda.json",
}


def _weights(out, art, refs, shared, row) -> list[str]:
    """The weight check of the row's artifact (once per file): row["weights"], failures to add."""
    if art.flavour not in ("custom", "stock", "qonnx"):
        row["weights"] = {"status": "not checked" if art.flavour == "tvm" else "sha256",
                          "note": WEIGHTS_NOT_CHECKED.get(art.flavour, "")}
        return []
    cache = shared["weights"]
    if art.file not in cache:
        try:
            cache[art.file] = weight_checks.check_file(out / art.file, art.flavour, refs.cm, refs.layer_names)
        except Exception as exc:  # a decoder crash is this row's failure, never a traceback
            cache[art.file] = {"status": "fail", "layers": len(refs.cm.layers), "exact": 0, "first_mismatch": None,
                               "mismatches": [{"layer": None, "problem": f"cannot be checked ({_one_line(exc)})"}],
                               "mismatch_count": 1}
    res = cache[art.file]
    row["weights"] = res
    if res["status"] == "ok":
        return []
    first = res["mismatches"][0]
    more = res["mismatch_count"] - 1
    where = f"layer {first['layer']}" if first["layer"] else art.file
    return [f"weights: {where}: {first['problem']}" + (f" (and {more} more)" if more > 0 else "")]


def _earliest(names: list[str], *layers) -> str | None:
    """The first of `layers` (None ignored) in graph order."""
    cands = [n for n in layers if n]
    order = {n: i for i, n in enumerate(names)}
    return min(cands, key=lambda n: order.get(n, len(order))) if cands else None


def _validate_one(out, art, manifests, feeds, refs, out_names, qemu_results, shared=None) -> dict:
    shared = shared or {"weights": {}, "spfq_changed": None}
    row = {"artifact": art.label, "file": art.file, "target": art.target, "kind": art.kind,
           "reference": "integer reference (int8 activations)" if art.reference == "int8" else "dequantised model",
           "tolerance": TOLERANCES[art.kind].as_dict(), "status": "ok", "metrics": None, "latency_ms": None,
           "failures": [], "first_diverging_layer": None}
    if art.skip:
        row.update(status="skip", note=art.skip)
        return row
    tol = TOLERANCES[art.kind]
    # integrity (checksums, decoded weights): these fail the row whatever its kind, informational too
    integrity = _weights(out, art, refs, shared, row)
    if shared["spfq_changed"] and art.flavour != "cuda":  # the cuda row checks model.spfq as its upload
        integrity.insert(0, shared["spfq_changed"])
    row["failures"].extend(integrity)
    weight_first = (row.get("weights") or {}).get("first_mismatch")
    try:
        outs, latency, per_layer = _run(out, art, manifests, feeds, refs, qemu_results, row, integrity)
    except runners.Unavailable as exc:
        if integrity:
            row.update(status="fail", note=str(exc), first_diverging_layer=weight_first)
        else:
            row.update(status="skip", note=str(exc))
        return row
    except Exception as exc:  # any load / run error is this row's failure, never a traceback
        row.update(status="fail", error=_one_line(exc), first_diverging_layer=weight_first)
        return row
    row["latency_ms"] = latency
    want, _ = refs.outputs(art.reference, art.float_layers)
    if art.flavour == "qonnx":
        want = [w[:runners.QONNX_SAMPLES] for w in want]
    if len(outs) != len(want):
        row.update(status="fail", error=f"{len(outs)} outputs, the reference has {len(want)}",
                   first_diverging_layer=weight_first)
        return row
    try:
        per_output = [metrics.compare(g, w, metrics.is_classifier(w, out_names[i] if i < len(out_names) else ""))
                      for i, (g, w) in enumerate(zip(outs, want))]
    except ValueError as exc:
        row.update(status="fail", error=str(exc), first_diverging_layer=weight_first)
        return row
    row["metrics"] = metrics.worst(per_output)
    row["failures"] = failures(row["metrics"], tol) + row["failures"]
    if art.reference == "int8" and art.flavour != "qonnx":  # also against the dequantised float model (reported)
        floats, _ = refs.outputs("float")
        row["vs_dequantised_model"] = metrics.worst(
            [metrics.compare(g, w, metrics.is_classifier(w, out_names[i] if i < len(out_names) else ""))
             for i, (g, w) in enumerate(zip(outs, floats))])
    numbers_first = None
    if per_layer is not None:
        layer_rows, first = per_layer
        row["layers"] = layer_rows
        bad = [r["layer"] for r in layer_rows if not r["local_ok"]]
        if bad:
            row["failures"].append(f"layer {bad[0]}: output differs from the reference layer on the same input "
                                   f"(rel err {next(r['local_max_rel_err'] for r in layer_rows if r['layer'] == bad[0]):.3g}"
                                   f" > {tol.layer_rel_err:g})")
        if row["failures"]:
            numbers_first = first
    elif row["failures"] and art.flavour == "tvm":
        row["note"] = "first diverging layer: not observable inside a compiled TVM library"
    row["first_diverging_layer"] = _earliest(refs.layer_names, weight_first, numbers_first)
    if shared.get("decode_prompt") and (art.flavour in ("custom", "stock") or
                                        (art.flavour == "tvm" and art.runner == "native")):
        try:
            row["failures"] += _decode(out, art, manifests, feeds, refs, shared["decode_prompt"], row, tol)
        except Exception as exc:  # a decode-loop error is this row's failure, never a traceback
            row["failures"].append(f"decode: {_one_line(exc)}")
    if tol.informational:
        soft = [f for f in row["failures"] if f not in integrity]
        row["failures"] = [f for f in row["failures"] if f in integrity]
        row["status"] = "fail" if row["failures"] else "info"
        if soft:
            row["note"] = "informational (int8 compute inside MatMulNBits is not held to parity): " + "; ".join(soft)
        if not row["failures"]:
            row["first_diverging_layer"] = None
    elif row["failures"]:
        row["status"] = "fail"
    return row


def _decode(out, art, manifests, feeds, refs, ids, row, tol) -> list[str]:
    """Greedy decoding through the artifact vs the reference (validate.decode); its failures."""
    ref_tokens, ref_logits = refs.greedy(art.reference, art.float_layers, ids)
    library = out / art.library if art.library else None
    if art.runner == "qemu":
        files = (manifests["onnx"] or {}).get("files", {})
        got = runners.generate_onnx_qemu(out, out / art.file, library, ids, len(ref_tokens), files)
        row["decode"], fails = decode.check(ref_tokens, ref_logits, got)
        return fails
    past = [n for n in feeds if n.startswith(decode.PAST)]
    if art.flavour == "tvm":
        run = runners.tvm_runner(out, art, ["input_ids", *past])
    else:
        sess = runners.ort_runners.session(out / art.file, library, accuracy_level=art.accuracy_level)
        run = lambda f: sess.run(None, f)  # noqa: E731
    logits = decode.teacher_forced(run, past, feeds, ids, ref_tokens)
    row["decode"], fails = decode.check(ref_tokens, ref_logits, [int(np.argmax(v)) for v in logits], logits)
    return fails + [f"decode: {f}" for f in failures(row["decode"]["metrics"], tol)]


def _run(out, art, manifests, feeds, refs, qemu_results, row, integrity):
    """(outputs, latency ms, per-layer (rows, first) or None). Checksum problems go to row['failures']
    and integrity. A runner script (run_onnx.py) runs only when its sha256 is the manifest's."""
    tvm_m = manifests["tvm"]
    manifest = manifests.get(art.flavour, manifests["onnx"])
    files = (manifest or {}).get("files", {})
    changed = {}
    for rel in [art.file] + ([art.library] if art.library else []):
        why = _checksum(out, rel, files)
        if why:
            if not (out / rel).is_file():
                raise SpfqError(why)
            changed[rel] = why
            row["failures"].append(why)
            integrity.append(why)
    for rel in [art.file] + ([art.library] if art.library else []):
        if rel.endswith(".so"):
            # never dlopen a damaged library in this process: a truncated one can die of SIGBUS
            why = runners.elf_problem(out / rel)
            if why is None and art.runner != "qemu" and (rel in changed or art.flavour != "tvm"):  # cheap probe
                why = runners.probe_library(out / rel, {"tvm": "tvm", "cuda": "cuda"}.get(art.flavour, "ort"))
            if why:
                raise SpfqError(f"{rel}: cannot be loaded ({why})")
    if art.flavour == "cuda":
        y, ms, recorded = runners.run_cuda(out, art, refs, row)
        return _flat(y), ms, _recorded_layers(recorded, art, refs)
    if art.flavour == "tvm":
        if art.runner == "qemu":
            res = qemu_results.get(art.file, "not run")
            if isinstance(res, str):
                raise SpfqError(res)
            return res[0], res[1], None
        names = (tvm_m.get("inputs") or {}).get("names", list(feeds))
        outs, ms = runners.run_tvm_native(out, art, [feeds[n] for n in names])
        return outs, ms, None
    if art.runner == "qemu":
        values, ms = runners.run_onnx_qemu(out, out / art.file, out / art.library if art.library else None, feeds,
                                           files, "manifest.json")
        outs = list(values.values())
    else:
        outs, ms = runners.run_onnx(out, art, feeds)
    per_layer = None
    if art.flavour in ("custom", "stock") and art.kind != "info":
        per_layer = _layers(out, art, feeds, refs, files)
    return outs, ms, per_layer


def _recorded_layers(recorded: dict, art, refs):
    """Per-layer check of layers whose (input, output) the runner recorded (the CUDA layers)."""
    names = [n for n in refs.layer_names if n in recorded]
    tensors = {n: (f"{n}:input", f"{n}:output") for n in names}
    values = {t: recorded[n][i] for n in names for i, t in enumerate(tensors[n])}
    _, hooked = refs.outputs(art.reference, art.float_layers)
    return layer_checks.check(values, tensors, {}, lambda n: refs.layer(art.reference, n, art.float_layers), hooked,
                              TOLERANCES[art.kind], TOLERANCES[art.kind])


def _layers(out, art, feeds, refs, files):
    import onnx

    from ..export.onnx import session as ort_runners

    model = onnx.load(str(out / art.file))
    tensors = layer_checks.layer_tensors(model, refs.layer_names)
    if not tensors:
        return [], None
    probe = layer_checks.with_layer_outputs(model, tensors)
    with tempfile.TemporaryDirectory(prefix="spfq-validate-") as tmp:
        path = Path(tmp) / "layers.onnx"
        path.write_bytes(probe.SerializeToString())
        library = out / art.library if art.library else None
        if art.runner == "qemu":
            values, _ = runners.run_onnx_qemu(out, path, library, feeds, files, "manifest.json")
        else:
            sess = ort_runners.session(path, library, accuracy_level=art.accuracy_level)
            values = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    values, steps = layer_checks.dequantize_q8(model, values)
    values, steps = layer_checks.channels_first(model, values), layer_checks.channels_first(model, steps)
    _, hooked = refs.outputs(art.reference, art.float_layers)
    epilogues = layer_checks.fused_epilogues(model, tensors)
    hooked = {n: (epilogues[n].numpy(v) if n in epilogues else v) for n, v in hooked.items()}

    def ref_layer(n):
        layer = refs.layer(art.reference, n, art.float_layers)
        return layer_checks.Fused(layer, epilogues[n]) if n in epilogues else layer

    return layer_checks.check(values, tensors, feeds, ref_layer, hooked,
                              TOLERANCES[art.kind], TOLERANCES[art.kind], steps)
