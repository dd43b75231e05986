"""Quality benchmark: fp32 vs round-to-nearest vs GPFQ vs SPFQ (and GPTQ), side by side on the
same calibration data, for the MNIST CNN (accuracy on the 5000 digits) and MiniLM (Lee Pearson,
WordSim Spearman, polarity accuracy), at binary, ternary, 2, 3, 4 bits and 4-bit + 50% sparse.

    python benchmarks/quality.py --out benchmarks/results/quality.json [--models mnist,minilm]
        [--methods rtn,gpfq,spfq,gptq,gptq-mse,gptq-act]

A method is a --method name, optionally with variants: -mse / -search (--scale), -act
(--act-order), -ridgeF (--ridge F), -var / -ls (--rescale), -bc (--bias-correction), -g32 / -g64 / -g128 (--group-size). Models: mnist, minilm, mobilenetv2 (top-1 agreement and
top-5 overlap with fp32 on 200 held-out photo crops). The JSON is rewritten after every run, so
a long benchmark that is stopped keeps what it measured. Writes JSON (per run: task metrics, per-layer relative output errors, the mean
weight error ||W - Q|| / ||W||, compression seconds; goals: each method against round to
nearest) and prints a Markdown table for the README. Nothing here is a test: it reports what
it measures.
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import sys
import time
from pathlib import Path

import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

from spfq_deploy.atomic import write_text  # noqa: E402
from spfq_deploy.compress import compress_model  # noqa: E402
from spfq_deploy.compress.folding import find_pairs, fold  # noqa: E402

SETTINGS = {  # name -> (bits, sparsity)
    "binary": (1, 0.0), "ternary": ("ternary", 0.0), "2-bit": (2, 0.0), "3-bit": (3, 0.0),
    "4-bit": (4, 0.0), "4-bit+50%": (4, 0.5),
}
METHODS = ("rtn", "gpfq", "spfq")
VARIANTS = {"mse": {"scale": "mse"}, "search": {"scale": "search"}, "act": {"act_order": True},
            "var": {"rescale": "var"}, "ls": {"rescale": "ls"}, "bc": {"bias_correction": True}}


def options(label: str) -> dict:
    """compress_model options of a method label such as gptq-act-mse."""
    method, *variants = label.split("-")
    opts = {"method": method}
    for v in variants:
        if v in ("g32", "g64", "g128"):
            opts["group_size"] = int(v[1:])
            continue
        if v.startswith("ridge"):
            try:
                opts["ridge"] = float(v[len("ridge"):])
            except ValueError:
                raise SystemExit(f"bad ridge variant {v!r} in {label!r} (e.g. gpfq-ridge0.3)") from None
            continue
        if v not in VARIANTS:
            raise SystemExit(f"unknown variant {v!r} in {label!r} (known: {', '.join(VARIANTS)})")
        opts.update(VARIANTS[v])
    return opts


@torch.no_grad()
def weight_error(model, res) -> float:
    """Mean over the compressed layers of ||W - Q|| / ||W|| (W after BatchNorm folding, as compressed)."""
    folded = copy.deepcopy(model).eval()
    fold(folded, find_pairs(folded))
    w, q = dict(folded.named_modules()), dict(res.reference.named_modules())
    errs = [float((w[n].weight - q[n].weight).norm() / w[n].weight.norm()) for n in res.model.layers]
    return sum(errs) / len(errs)


def workload(name: str):
    if name == "mnist":
        import examples.mnist_cnn as mod
    elif name == "minilm":
        import examples.minilm as mod
    elif name == "mobilenetv2":
        import examples.mobilenetv2 as mod
    else:
        raise SystemExit(f"unknown model {name!r} (mnist, minilm, mobilenetv2)")
    return mod


def run(models, settings, methods, seed, save=lambda results, spreads: None):
    """Every (model, setting, method); save(results so far, calibration spreads) after each."""
    from spfq_deploy.compress.calibration import as_batches, spread
    results, spreads = [], {}
    for model_name in models:
        mod = workload(model_name)
        model = mod.build()
        calib = mod.calibration(256)
        spreads[model_name] = spread(as_batches(calib))
        t0 = time.perf_counter()
        base = mod.evaluate(model)
        results.append({"model": model_name, "setting": "fp32", "method": "fp32", "metrics": base,
                        "eval_seconds": time.perf_counter() - t0})
        print(f"[{model_name}] fp32 {base}", flush=True)
        for setting in settings:
            bits, sparsity = SETTINGS[setting]
            for method in methods:
                t0 = time.perf_counter()
                res = compress_model(model, calib, bits=bits, sparsity=sparsity, seed=seed, progress=False,
                                     **options(method))
                secs = time.perf_counter() - t0
                metrics = mod.evaluate(res.reference)
                errs = [r.rel_error for r in res.report]
                row = {"model": model_name, "setting": setting, "method": method, "options": options(method),
                       "metrics": metrics, "compress_seconds": secs,
                       "layer_rel_error": {r.name: r.rel_error for r in res.report},
                       "mean_rel_error": sum(errs) / len(errs), "last_rel_error": errs[-1],
                       "mean_weight_rel_error": weight_error(model, res),
                       "sparsity": sum(r.sparsity for r in res.report) / len(errs),
                       "chosen_C": {r.name: r.C for r in res.report}}
                results.append(row)
                save(results, spreads)
                print(f"[{model_name}] {setting:10s} {method:12s} {metrics} mean err {row['mean_rel_error']:.4f} "
                      f"weight err {row['mean_weight_rel_error']:.4f} ({secs:.1f} s)", flush=True)
    return results, spreads


def beats_rtn(results):
    """Per model/setting: does each method's layer output error beat RTN's, layer by layer?"""
    out = {}
    by = {(r["model"], r["setting"], r["method"]): r for r in results}
    for (model, setting, method), r in by.items():
        if method in ("rtn", "fp32"):
            continue
        rtn = by.get((model, setting, "rtn"))
        if not rtn:
            continue
        layers = r["layer_rel_error"]
        wins = sum(layers[n] < rtn["layer_rel_error"][n] for n in layers)
        out[f"{model}/{setting}/{method}"] = {
            "layers_better_than_rtn": wins, "layers": len(layers),
            "mean_rel_error": r["mean_rel_error"], "rtn_mean_rel_error": rtn["mean_rel_error"],
            "mean_better": r["mean_rel_error"] < rtn["mean_rel_error"]}
    return out


def goals(results):
    """Each method against round to nearest at every model and setting (SPFQ.md: error
    correction must beat plain rounding at every bit width, measured side by side): its mean
    layer output error below RTN's, and every task metric at least RTN's."""
    out = []
    by = {(r["model"], r["setting"], r["method"]): r for r in results}
    for (model, setting, method), r in by.items():
        rtn = by.get((model, setting, "rtn"))
        if method in ("rtn", "fp32") or not rtn:
            continue
        out.append({"goal": f"{model} {setting} {method}: mean layer output error below rtn's", "model": model,
                    "setting": setting, "method": method, "measured": r["mean_rel_error"],
                    "target": rtn["mean_rel_error"], "met": r["mean_rel_error"] < rtn["mean_rel_error"]})
        out.append({"goal": f"{model} {setting} {method}: every task metric at least rtn's", "model": model,
                    "setting": setting, "method": method, "measured": r["metrics"], "target": rtn["metrics"],
                    "met": all(r["metrics"][k] >= v for k, v in rtn["metrics"].items())})
    return out


def markdown(results):
    lines = []
    for model in dict.fromkeys(r["model"] for r in results):
        rows = [r for r in results if r["model"] == model]
        keys = list(rows[0]["metrics"])
        lines.append(f"\n**{model}**\n")
        lines.append("| setting | method | " + " | ".join(keys) +
                     " | mean layer rel. error | last layer rel. error | mean weight rel. error | compress s |")
        lines.append("|" + "---|" * (len(keys) + 6))
        for r in rows:
            m = " | ".join(f"{r['metrics'][k]:.4f}" for k in keys)
            err = f"{r['mean_rel_error']:.4f} | {r['last_rel_error']:.4f} | {r['mean_weight_rel_error']:.4f} | " \
                f"{r['compress_seconds']:.1f}" if "mean_rel_error" in r else "- | - | - | -"
            lines.append(f"| {r['setting']} | {r['method']} | {m} | {err} |")
    return "\n".join(lines)


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--models", default="mnist,minilm")
    ap.add_argument("--settings", default=",".join(SETTINGS))
    ap.add_argument("--methods", default=",".join(METHODS))
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--out", default="benchmarks/results/quality.json")
    args = ap.parse_args(argv)
    torch.manual_seed(0)
    methods = args.methods.split(",")
    for m in methods:
        options(m)  # a typo fails now, not after an hour of runs
    t0, load0 = time.perf_counter(), os.getloadavg()
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)

    def save(results, spreads):
        doc = {"machine": {"cpu": platform.processor() or platform.machine(), "threads": torch.get_num_threads(),
                           "torch": torch.__version__, "python": platform.python_version(),
                           "load_avg_before": list(load0), "load_avg_after": list(os.getloadavg())},
               "calibration": "each model file's calibration(256): MNIST 256 class-balanced digits; MiniLM 256 "
                              "sentences + 256 words + 128 phrases + 16 documents; MobileNetV2 256 crops",
               "calibration_spread": spreads,
               "results": results, "vs_rtn": beats_rtn(results), "goals": goals(results),
               "wall_s": time.perf_counter() - t0}
        write_text(args.out, json.dumps(doc, indent=1))
        return doc

    results, spreads = run(args.models.split(","), args.settings.split(","), methods, args.seed, save)
    doc = save(results, spreads)
    print(markdown(results))
    print("\nlayer output error vs round-to-nearest:")
    for k, v in doc["vs_rtn"].items():
        print(f"  {k}: {v['layers_better_than_rtn']}/{v['layers']} layers better, mean "
              f"{v['mean_rel_error']:.4f} vs {v['rtn_mean_rel_error']:.4f}")
    print(f"\ngoals: {sum(g['met'] for g in doc['goals'])}/{len(doc['goals'])} met")
    for g in doc["goals"]:
        if not g["met"]:
            print(f"  missed: {g['goal']}")
    print(f"load average before {load0}, after {doc['machine']['load_avg_after']}")


if __name__ == "__main__":
    main()
