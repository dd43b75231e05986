"""`spfq-deploy report OUT_DIR... -o report.md`: one markdown report for export folders.

Per folder: the compression summary (the `inspect` table of OUT/model.spfq), the parity matrix
of `validate --json`, the latency table of `bench --json`, the task metric of the model file's
evaluate(model) on the fp32 model and on the reference rebuilt from the .spfq, and PNG figures
next to the report (latency: bench.charts.latency_chart; parity: bench.charts.parity_chart).
JSON files are matched to folders by their "folder" field; by default OUT_DIR.validate.json /
OUT_DIR.bench.json are used when they exist.
"""

from __future__ import annotations

import json
import math
import time
from pathlib import Path

from .errors import SpfqError

MARKS = {"ok": "ok", "fail": "**FAILED**", "skip": "skip", "info": "info"}


def _load(path) -> dict:
    try:
        return json.loads(Path(path).read_text())
    except (OSError, ValueError) as exc:
        raise SpfqError(f"{path}: not a readable JSON file ({str(exc).splitlines()[0]})") from None


def _match(folder: Path, docs: list[dict], default: Path) -> dict | None:
    for d in docs:
        if Path(d.get("folder", "")).resolve() == folder.resolve():
            return d
    return _load(default) if default.is_file() else None


def _num(v, fmt) -> str:
    if v is None:
        return "-"
    if isinstance(v, str):
        return v
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return format(v, fmt)


def _md_table(headers: list[str], rows: list[list]) -> str:
    out = ["| " + " | ".join(headers) + " |", "|" + "|".join("---" for _ in headers) + "|"]
    out += ["| " + " | ".join(str(c).replace("|", "/") for c in r) + " |" for r in rows]
    return "\n".join(out)


def parity_section(doc: dict) -> str:
    rows = []
    for r in doc["rows"]:
        m = r.get("metrics") or {}
        top1 = m.get("top1_agreement")
        rows.append([MARKS.get(r["status"], r["status"]), r["artifact"], r["target"], _num(m.get("max_abs_err"), ".3g"),
                     _num(m.get("max_rel_err"), ".3g"), _num(m.get("min_cosine"), ".6f"), _num(m.get("snr_db"), ".1f"),
                     "-" if top1 is None else f"{100 * top1:.1f}%", r.get("first_diverging_layer") or "-",
                     _num(r.get("latency_ms"), ".2f"),
                     (r.get("error") or "; ".join(r.get("failures") or []) or r.get("note") or "")[:160]])
    s = doc["summary"]
    return "\n".join([_md_table(["", "artifact", "target", "max abs err", "max rel err", "cosine (min)", "SNR dB",
                                 "top-1", "first diverging layer", "latency ms", "note"], rows), "",
                      f"{s['ok']} ok, {s['fail']} failed, {s['skip']} skipped, {s['info']} informational; "
                      f"{doc['samples']} samples from `{doc['data']}`."])


def latency_section(doc: dict) -> str:
    labels = {a["name"]: a["label"] for a in doc["artifacts"]}
    rows = []
    for r in sorted(doc["rows"], key=lambda r: (r["threads"], r.get("batch") or 0)):
        if "median_ms" in r:
            rows.append([r["artifact"], r["batch"], r["threads"], f"{r['median_ms']:.3f}",
                         f"{r['p10_ms']:.3f} - {r['p90_ms']:.3f}",
                         f"{r['ratio_vs_fp32']:.2f}x" if "ratio_vs_fp32" in r else "-"])
        else:
            rows.append([r["artifact"], r.get("batch", "-"), r["threads"], "error", r.get("error", ""), "-"])
    m = doc["machine"]
    lines = [_md_table(["runner", "batch", "threads", "median ms", "p10 - p90 ms", "vs fp32"], rows), ""]
    lines += [f"- `{n}`: {labels[n]}" for n in labels]
    lines += [f"- not timed: {x['artifact']} @ {x['target']}: {x['why']}" for x in doc.get("not_timed", [])]
    lines += ["", f"{doc['warmup']} warm-up + {doc['repeat']} timed calls per cell; inputs `{doc['inputs']['file']}` "
                  f"{doc['inputs']['batching']}; {m['cpu']}, {m['cores']} cores, load average "
                  f"{m['load_avg_before'][0]:.2f} before / {m['load_avg_after'][0]:.2f} after (timings on a loaded "
                  f"machine are noisy; ratios are from the same run)."]
    return "\n".join(lines)


def task_section(spfq: Path) -> str:
    """The model file's evaluate() on the fp32 model and on the reference rebuilt from the .spfq."""
    from .modelspec import load_model
    from .pack import container
    from .reference import load_reference

    spec = container.read_header(spfq)["model_spec"]
    fp32, module = load_model(spec)
    evaluate = getattr(module, "evaluate", None)
    if evaluate is None:
        return f"The model file ({spec}) has no `evaluate(model)`: no task metric."
    t0 = time.perf_counter()
    base, comp = evaluate(fp32), evaluate(load_reference(spfq))
    rows = [[k, f"{base[k]:.4f}", f"{comp[k]:.4f}", f"{comp[k] - base[k]:+.4f}"] for k in comp]
    return "\n".join([_md_table(["metric", "fp32", "compressed (rebuilt from model.spfq)", "change"], rows), "",
                      f"`{spec}` evaluate(), {time.perf_counter() - t0:.0f} s."])


def write_report(folders, output, validate_files=(), bench_files=(), validate_docs=(), task: bool = True,
                 task_only=()) -> Path:
    """task_only: glob patterns of folder names whose evaluate() runs (default: every folder)."""
    import fnmatch

    from .bench.charts import latency_chart, parity_chart
    from .pack import container
    from .tables import inspect_table

    output = Path(output)
    if not output.parent.is_dir():
        raise SpfqError(f"{output.parent}: output directory does not exist")
    vdocs = list(validate_docs) + [_load(f) for f in validate_files]
    bdocs = [_load(f) for f in bench_files]
    parts = ["# spfq-deploy report", "",
             f"Generated {time.strftime('%Y-%m-%d %H:%M:%S')} for: " + ", ".join(f"`{f}`" for f in folders), ""]
    for folder in map(Path, folders):
        if not (folder / "model.spfq").is_file():
            raise SpfqError(f"{folder}: no model.spfq (not an spfq-deploy export folder)")
        stem = f"{output.stem}_{folder.name}"
        files = sorted(p.name for p in folder.iterdir() if p.is_file()) + \
            sorted(str(p.relative_to(folder)) for p in (folder / "lib").rglob("*") if p.is_file())
        parts += [f"## {folder.name}", "", f"Folder `{folder}`: " + ", ".join(f"`{f}`" for f in files), "",
                  "### Compression", "", "```", inspect_table(container.read_header(folder / "model.spfq")), "```", ""]
        v = _match(folder, vdocs, folder.with_name(folder.name + ".validate.json"))
        parts += ["### Parity (spfq-deploy validate)", ""]
        if v is None:
            parts += ["Not run (no validate JSON for this folder).", ""]
        else:
            png = parity_chart(v, output.parent / f"{stem}_parity.png")
            parts += [parity_section(v), "", f"![parity]({png.name})", ""]
        b = _match(folder, bdocs, folder.with_name(folder.name + ".bench.json"))
        parts += ["### Latency on the host (spfq-deploy bench)", ""]
        if b is None:
            parts += ["Not run (no bench JSON for this folder).", ""]
        else:
            png = latency_chart(b, output.parent / f"{stem}_latency.png")
            parts += [latency_section(b), "", f"![latency]({png.name})", ""]
        parts += ["### Task metric", ""]
        if not task:
            parts += ["Skipped (--no-task).", ""]
        elif task_only and not any(fnmatch.fnmatch(folder.name, p) for p in task_only):
            parts += [f"Skipped (--task-only {' '.join(task_only)}).", ""]
        else:
            try:
                parts += [task_section(folder / "model.spfq"), ""]
            except Exception as exc:  # the report still gets written
                parts += [f"evaluate() failed: {str(exc).strip().splitlines()[0][:300]}", ""]
    from .atomic import write_text

    write_text(output, "\n".join(parts))
    return output
