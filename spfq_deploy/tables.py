"""Plain-text tables for the terminal: the compression summary and the `inspect` view."""

from __future__ import annotations


def render(headers: list[str], rows: list[list], align: str | None = None) -> str:
    """Fixed-width table; align is one char per column ('l' or 'r'), numbers right by default."""
    cells = [[str(h) for h in headers]] + [[_fmt(c) for c in r] for r in rows]
    widths = [max(len(r[i]) for r in cells) for i in range(len(headers))]
    align = align or "".join("r" if rows and isinstance(rows[0][i], (int, float)) else "l"
                             for i in range(len(headers)))
    out = []
    for k, r in enumerate(cells):
        out.append("  ".join(c.rjust(w) if a == "r" else c.ljust(w) for c, w, a in zip(r, widths, align)).rstrip())
        if k == 0:
            out.append("  ".join("-" * w for w in widths))
    return "\n".join(out)


def _fmt(c) -> str:
    if c is None:
        return "-"
    if isinstance(c, float):
        return f"{c:.4g}" if abs(c) < 1e4 else f"{c:,.0f}"
    if isinstance(c, int):
        return f"{c:,}"
    return str(c)


def compression_summary(report) -> str:
    """Per layer: bits, sparsity, chosen C, relative output error ||XW^T - XtQ^T|| / ||XW^T||."""
    rows = [[r.name, r.kind, "x".join(map(str, r.shape)), r.bits, round(100 * r.sparsity, 1), None if r.C is None else round(r.C, 4),
             None if r.lam_factor is None else round(r.lam_factor, 3), round(r.rel_error, 4),
             None if r.align_error is None else round(r.align_error, 4), round(r.seconds, 2)]
            for r in report]
    return render(["layer", "kind", "shape", "bits", "sparsity %", "C", "lam f", "rel err", "align err", "s"],
                  rows, "lllrrrrrrr")


def inspect_table(header: dict) -> str:
    """Per-layer and total bits/weight (actual: codes, masks, scales, padding), bytes, ratio vs fp32;
    `scales`: one float16 scale per row, or per group of G input columns (gG)."""
    rows, tot_bits, tot_w = [], 0, 0
    for name, e in header["layers"].items():
        sr = e["storage_report"]
        tot_bits += sr["total_bits"]
        tot_w += sr["weights"]
        sparsity = e.get("meta", {}).get("sparsity")
        rows.append([name, e["kind"], "x".join(map(str, e["weight_shape"])),
                     "ternary" if e["alphabet"] == "ternary" else f"{e['bits']}", e["layout"],
                     f"g{e['group_size']}" if e.get("group_size") else "row",
                     None if sparsity is None else round(100 * sparsity, 1),
                     round(sr["bits_per_weight"], 4), (sr["total_bits"] + 7) // 8, round(32 / sr["bits_per_weight"], 2)])
    body = render(["layer", "kind", "shape", "bits", "layout", "scales", "sparsity %", "bits/weight", "bytes",
                   "x fp32"], rows, "lllllrrrrr")
    packed = (tot_bits + 7) // 8
    fp32 = 4 * tot_w
    others = sum(4 * _numel(t["shape"]) for k, t in header.get("tensors", {}).items()
                 if k.startswith("float/") or k.endswith("/bias"))
    lines = [body, "",
             f"compressed layers: {tot_w:,} weights in {packed:,} bytes = {tot_bits / max(tot_w, 1):.4f} bits/weight "
             f"({fp32 / max(packed, 1):.2f}x smaller than fp32 {fp32:,} bytes)",
             f"file: {header['file_bytes']:,} bytes on disk, {(fp32 + others) / header['file_bytes']:.2f}x smaller "
             f"than the fp32 model ({fp32 + others:,} bytes; {len(header.get('float_params', []))} float "
             f"tensors kept as they were; format version {header['format_version']})"]
    spread = header.get("meta", {}).get("calibration_spread")
    if spread:  # files written before the spread was recorded have only the sample count
        from .compress.calibration import spread_line
        lines.append(f"calibration: {spread_line(spread)}")
    info = header.get("meta", {}).get("bits_budget")
    if info:
        lines += ["", budget_summary(info, header.get("meta", {}).get("layer_order") or list(header["layers"]))]
    return "\n".join(lines)


def _numel(shape) -> int:
    n = 1
    for s in shape:
        n *= int(s)
    return n


def budget_summary(info: dict, order: list[str] | None = None, seconds: dict | None = None) -> str:
    """The --bits-budget block of the compress summary and of `inspect` (meta["bits_budget"]):
    budget, achieved bits/weight, why a gap over CLOSE remains, widths used, first/last layer."""
    from .compress.budget import CLOSE

    b, got = info["budget"], info["achieved_bits_per_weight"]
    close = info.get("closest_bits_per_weight", got)
    lines = [f"bits budget {b:g}: achieved {got:.4f} bits/weight incl. scales and padding ({b - got:.4f} below; "
             f"candidates {','.join(info['candidates'])}; least sum of squared relative output errors)"]
    if b - got > CLOSE:
        lines.append(f"  more than {CLOSE} below the budget: the layer sizes allow no closer fit (the most any "
                     f"assignment of these candidates reaches within it is {close:.4f} bits/weight)")
    widths = info["widths"]
    names = [n for n in (order or list(widths)) if n in widths]
    counts: dict[str, int] = {}
    for n in names:
        counts[widths[n]] = counts.get(widths[n], 0) + 1
    lines.append("  widths: " + ", ".join(f"{w if w == 'ternary' else w + '-bit'} x{c}"
                                          for w, c in sorted(counts.items(), key=lambda wc: _order(wc[0]))))
    ends = [("first", names[0])] + ([("last", names[-1])] if len(names) > 1 else []) if names else []
    for which, n in ends:
        point = info.get("curves", {}).get(n, {}).get(widths[n])
        if point is None or n not in info.get("layer_weights", {}):
            lines.append(f"  {which} layer {n}: {widths[n]}")
            continue
        bpw = point["total_bits"] / info["layer_weights"][n]
        side = "above" if bpw > got else "below" if bpw < got else "at"
        lines.append(f"  {which} layer {n}: {widths[n]} ({bpw:.2f} bits/weight, {side} the file's {got:.2f}; "
                     f"measured rel err {point['rel_error']:.4f})")
    if seconds:
        measured = "given (measured earlier)" if seconds.get("measure") is None else \
            f"measured in {seconds['measure']:.1f} s"
        lines.append(f"  curves: {len(info['candidates'])} widths per layer {measured}; "
                     f"final pass {seconds['compress']:.1f} s")
    return "\n".join(lines)


def _order(width: str) -> float:
    return 1.58 if width == "ternary" else float(width)
