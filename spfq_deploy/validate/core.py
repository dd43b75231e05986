"""`spfq-deploy validate OUT_DIR`: every artifact of an export folder against its reference.

Reference: the dequantised PyTorch model rebuilt from OUT/model.spfq (float artifacts), or the
integer reference (spfq_deploy.reference.int8_activation_reference) for artifacts built with
int8 activations. Same inputs for both: OUT/inputs.npz or a --data .npz with the same names.
Rules: tolerances.TOLERANCES. First diverging layer: layers.py.
"""

from __future__ import annotations

import json
import platform
import tempfile
from pathlib import Path

import numpy as np
import torch

from ..export.source import file_sha256
from ..errors import SpfqError
from . import layers as layer_checks
from . import metrics, runners
from .tolerances import TOLERANCES, failures

HOST = {"x86_64": "x86_64", "aarch64": "arm64"}.get(platform.machine(), platform.machine())
MANIFESTS = ("manifest.json", "manifest.tvm.json", "manifest.cuda.json")


def _read_manifest(path: Path) -> dict | None:
    if not path.is_file():
        return None
    try:
        return json.loads(path.read_text())
    except (OSError, ValueError) as exc:
        raise SpfqError(f"{path}: not a readable manifest ({str(exc).splitlines()[0]})") from None


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

    def __init__(self, out: Path, spec: str | None, feeds: dict, layer_names: list[str]):
        from ..pack import container
        from ..reference import load_reference

        self.cm = container.load(out / "model.spfq")
        self.model = load_reference(out / "model.spfq", spec)
        self.args = [torch.from_numpy(v) for v in feeds.values()]
        self.layer_names = layer_names
        self._cache, self._int8 = {}, None
        self._int8_layers = {}

    def module(self, kind: str):
        if kind == "float":
            return self.model
        if self._int8 is None:
            from ..reference import int8_activation_reference

            self._int8 = int8_activation_reference(self.model, self.cm)
        return self._int8

    def outputs(self, kind: str) -> tuple[list, dict]:
        if kind not in self._cache:
            y, hooked = layer_checks.hooked_outputs(self.module(kind), self.args, self.layer_names)
            self._cache[kind] = (_flat(y), hooked)
        return self._cache[kind]

    def layer(self, kind: str, name: str):
        if kind == "float":
            return self.model.get_submodule(name)
        from ..reference import Int8ActivationLayer

        if name not in self._int8_layers:
            self._int8_layers[name] = Int8ActivationLayer(self.cm.layers[name])
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
        return f"{rel}: sha256 differs from the manifest ({path.stat().st_size:,} bytes, manifest {entry.get('bytes', '?'):,})"
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
        refs = _References(out, spec, feeds, layer_names)
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
        qemu_results = runners.run_tvm_qemu(out, qemu, (tvm_m.get("inputs") or {}).get("names", names), feeds)
    for art in arts:
        rows.append(_validate_one(out, art, manifests, feeds, refs, out_names, qemu_results))
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


def _validate_one(out, art, manifests, feeds, refs, out_names, qemu_results) -> dict:
    row = {"artifact": art.label, "file": art.file, "target": art.target, "kind": art.kind,
           "reference": "integer reference (int8 activations)" if art.reference == "int8" else "dequantised model",
           "tolerance": TOLERANCES[art.kind].as_dict(), "status": "ok", "metrics": None, "latency_ms": None,
           "failures": [], "first_diverging_layer": None}
    if art.skip:
        row.update(status="skip", note=art.skip)
        return row
    tol = TOLERANCES[art.kind]
    try:
        outs, latency, per_layer = _run(out, art, manifests, feeds, refs, qemu_results, row)
    except runners.Unavailable as exc:
        row.update(status="skip", note=str(exc))
        return row
    except Exception as exc:  # any load / run error is this row's failure, never a traceback
        row.update(status="fail", error=_one_line(exc))
        return row
    row["latency_ms"] = latency
    want, _ = refs.outputs(art.reference)
    if art.flavour == "qonnx":
        want = [w[:runners.QONNX_SAMPLES] for w in want]
    if len(outs) != len(want):
        row.update(status="fail", error=f"{len(outs)} outputs, the reference has {len(want)}")
        return row
    try:
        per_output = [metrics.compare(g, w, metrics.is_classifier(w, out_names[i] if i < len(out_names) else ""))
                      for i, (g, w) in enumerate(zip(outs, want))]
    except ValueError as exc:
        row.update(status="fail", error=str(exc))
        return row
    row["metrics"] = metrics.worst(per_output)
    row["failures"] = failures(row["metrics"], tol) + row["failures"]
    if art.reference == "int8" and art.flavour != "qonnx":  # also against the dequantised float model (reported)
        floats, _ = refs.outputs("float")
        row["vs_dequantised_model"] = metrics.worst(
            [metrics.compare(g, w, metrics.is_classifier(w, out_names[i] if i < len(out_names) else ""))
             for i, (g, w) in enumerate(zip(outs, floats))])
    if per_layer is not None:
        layer_rows, first = per_layer
        row["layers"] = layer_rows
        bad = [r["layer"] for r in layer_rows if not r["local_ok"]]
        if bad:
            row["failures"].append(f"layer {bad[0]}: output differs from the reference layer on the same input "
                                   f"(rel err {next(r['local_max_rel_err'] for r in layer_rows if r['layer'] == bad[0]):.3g}"
                                   f" > {tol.layer_rel_err:g})")
        if row["failures"]:
            row["first_diverging_layer"] = first
    elif row["failures"] and art.flavour == "tvm":
        row["note"] = "first diverging layer: not observable inside a compiled TVM library"
    if tol.informational:
        row["status"] = "info"
        if row["failures"]:
            row["note"] = "informational (int8 compute inside MatMulNBits is not held to parity): " + "; ".join(row["failures"])
            row["failures"] = []
    elif row["failures"]:
        row["status"] = "fail"
    return row


def _run(out, art, manifests, feeds, refs, qemu_results, row):
    """(outputs, latency ms, per-layer (rows, first) or None). Checksum problems go to row['failures']."""
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
        values, ms = runners.run_onnx_qemu(out, out / art.file, out / art.library if art.library else None, feeds)
        outs = list(values.values())
    else:
        outs, ms = runners.run_onnx(out, art, feeds)
    per_layer = None
    if art.flavour in ("custom", "stock") and art.kind != "info":
        per_layer = _layers(out, art, feeds, refs)
    return outs, ms, per_layer


def _recorded_layers(recorded: dict, art, refs):
    """Per-layer check of layers whose (input, output) the runner recorded (the CUDA layers)."""
    names = [n for n in refs.layer_names if n in recorded]
    tensors = {n: (f"{n}:input", f"{n}:output") for n in names}
    values = {t: recorded[n][i] for n in names for i, t in enumerate(tensors[n])}
    _, hooked = refs.outputs(art.reference)
    return layer_checks.check(values, tensors, {}, lambda n: refs.layer(art.reference, n), hooked,
                              TOLERANCES[art.kind], TOLERANCES[art.kind])


def _layers(out, art, feeds, refs):
    import onnx

    from ..export import runners as ort_runners

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
            values, _ = runners.run_onnx_qemu(out, path, library, feeds)
        else:
            sess = ort_runners.session(path, library, accuracy_level=art.accuracy_level)
            values = dict(zip([o.name for o in sess.get_outputs()], sess.run(None, feeds)))
    _, hooked = refs.outputs(art.reference)
    return layer_checks.check(values, tensors, feeds, lambda n: refs.layer(art.reference, n), hooked,
                              TOLERANCES[art.kind], TOLERANCES[art.kind])
