"""The validate report: one line per artifact x target ([ok] / [x] / [skip] / [info]) and JSON."""

from __future__ import annotations

import json
import math

MARKS = {"ok": "[ok]", "fail": "[x]", "skip": "[skip]", "info": "[info]"}
COLUMNS = ("", "artifact", "target", "max abs err", "max rel err", "cosine (min)", "SNR dB", "top-1",
           "weights", "first diverging layer", "latency ms", "greedy tokens")
# the weight check (weights.py): every layer decoded and equal to model.spfq / not / not decoded
WEIGHTS = {"ok": "exact", "fail": "differ", "sha256": "sha256", "not checked": "-"}


def _num(v, fmt) -> str:
    if v is None:
        return "-"
    if isinstance(v, float) and math.isinf(v):
        return "inf" if v > 0 else "-inf"
    return format(v, fmt)


def _cells(row: dict) -> list[str]:
    m = row.get("metrics") or {}
    top1 = m.get("top1_agreement")
    return [MARKS[row["status"]], row["artifact"], row["target"], _num(m.get("max_abs_err"), ".3g"),
            _num(m.get("max_rel_err"), ".3g"), _num(m.get("min_cosine"), ".6f"), _num(m.get("snr_db"), ".1f"),
            "-" if top1 is None else f"{100 * top1:.1f}%",
            WEIGHTS.get((row.get("weights") or {}).get("status"), "-"), row.get("first_diverging_layer") or "-",
            _num(row.get("latency_ms"), ".2f"), _greedy(row.get("decode"))]


def _greedy(d: dict | None) -> str:
    """Decoders (validate.decode): greedy tokens equal to the reference's, of the steps run."""
    if not d:
        return "-"
    return f"{round(d['token_agreement'] * d['steps'])}/{d['steps']}"


def table(report: dict) -> str:
    rows = [list(COLUMNS)] + [_cells(r) for r in report["rows"]]
    widths = [max(len(r[i]) for r in rows) for i in range(len(COLUMNS))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)).rstrip() for r in rows]
    lines.insert(1, "  ".join("-" * w for w in widths))
    notes = []
    for r in report["rows"]:
        why = r.get("error") or "; ".join(r.get("failures", [])) or r.get("note")
        if why:
            notes.append(f"{MARKS[r['status']]} {r['artifact']} @ {r['target']}: {why}")
    s = report["summary"]
    tail = (f"{s['ok']} ok, {s['fail']} failed, {s['skip']} skipped, {s['info']} informational; "
            f"{report['samples']} samples from {report['data']}")
    return "\n".join(lines + ([""] + notes if notes else []) + ["", tail])


def _clean(v):
    if isinstance(v, float) and not math.isfinite(v):
        return None if math.isnan(v) else ("inf" if v > 0 else "-inf")
    if isinstance(v, dict):
        return {k: _clean(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_clean(x) for x in v]
    return v


def to_json(report: dict) -> str:
    """Strict JSON (infinities as the strings "inf" / "-inf")."""
    return json.dumps(_clean(report), indent=2) + "\n"
