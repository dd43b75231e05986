"""PNG charts (matplotlib, Agg backend: no display needed)."""

from __future__ import annotations

from pathlib import Path


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def latency_chart(doc: dict, path: str | Path, title: str | None = None) -> Path:
    """One panel per batch size: bars per runner, grouped by thread count; median with p10-p90 whiskers."""
    plt = _pyplot()
    names = [a["name"] for a in doc["artifacts"]]
    batches, threads = doc["batches"], doc["threads"]
    cell = {(r["artifact"], r.get("batch"), r["threads"]): r for r in doc["rows"] if "median_ms" in r}
    fig, axes = plt.subplots(1, len(batches), figsize=(max(5.0, 1.2 * len(names) * len(threads)) * len(batches) / 1.5, 4.2),
                             squeeze=False)
    width = 0.8 / max(len(names), 1)
    for ax, b in zip(axes[0], batches):
        for i, n in enumerate(names):
            xs, ys, lo, hi = [], [], [], []
            for j, t in enumerate(threads):
                r = cell.get((n, b, t))
                if r is None:
                    continue
                xs.append(j + (i - (len(names) - 1) / 2) * width)
                ys.append(r["median_ms"])
                lo.append(r["median_ms"] - r["p10_ms"])
                hi.append(r["p90_ms"] - r["median_ms"])
            ax.bar(xs, ys, width, yerr=[lo, hi], capsize=2, label=n, color="0.55" if n == "fp32" else None)
        ax.set_xticks(range(len(threads)), [f"{t} thread{'s' if t > 1 else ''}" for t in threads])
        ax.set_title(f"batch {b}")
        ax.set_ylabel("median latency, ms (p10-p90)")
        ax.grid(axis="y", alpha=0.3)
    axes[0][-1].legend(fontsize=8)
    fig.suptitle(title or f"{Path(doc['folder']).name}: latency on the {doc['host']} host")
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path


def parity_chart(report: dict, path: str | Path, title: str | None = None) -> Path:
    """1 - min cosine per validate row (log scale; lower is closer to the reference), colour by status."""
    plt = _pyplot()
    rows = [r for r in report["rows"] if r.get("metrics")]
    labels = [f"{r['artifact']} @ {r['target']}" for r in rows]
    vals = [max(1.0 - float(r["metrics"]["min_cosine"]), 1e-12) for r in rows]
    colors = {"ok": "tab:green", "info": "tab:blue", "fail": "tab:red"}
    fig, ax = plt.subplots(figsize=(8, 0.45 * len(rows) + 1.4))
    ax.barh(range(len(rows)), vals, color=[colors.get(r["status"], "0.5") for r in rows])
    ax.set_yticks(range(len(rows)), labels, fontsize=8)
    ax.invert_yaxis()
    ax.set_xscale("log")
    ax.set_xlabel("1 - cosine vs the reference (min over samples; log scale)")
    ax.set_title(title or f"{Path(report['folder']).name}: parity (green ok, blue info, red failed)")
    ax.grid(axis="x", alpha=0.3)
    fig.tight_layout()
    path = Path(path)
    fig.savefig(path, dpi=110)
    plt.close(fig)
    return path
