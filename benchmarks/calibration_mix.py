"""What calibration coverage does (issue 16): MiniLM compressed with calibrations that mix more
of the input shapes it is used on, each evaluated on Lee / WordSim / polarity.

    python benchmarks/calibration_mix.py --mixes A,B,C,D,E --settings 3 \
        --methods gpfq,gptq-act,rtn,gpfq-ridge1 --out benchmarks/results/calibration_mix.json

Mixes (sentences, words, phrases, documents; examples/minilm.py calibration()): A 256/0/0/0
(sentences only), B 256/256/0/0, C 256/256/128/0, D 256/256/128/16 (the default), E
256/512/128/16, F 256/1024/128/16. Methods as in quality.py (-act, -ridgeF, ...). The JSON is
rewritten after every run; one run per cell (gpfq / gptq / rtn are deterministic). Not a test.
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))
sys.path.insert(0, str(Path(__file__).resolve().parent))

from quality import options, weight_error  # noqa: E402

import examples.minilm as minilm  # noqa: E402
from spfq_deploy.atomic import write_text  # noqa: E402
from spfq_deploy.compress import compress_model  # noqa: E402
from spfq_deploy.compress.calibration import as_batches, spread  # noqa: E402

MIXES = {"A": (256, 0, 0, 0), "B": (256, 256, 0, 0), "C": (256, 256, 128, 0), "D": (256, 256, 128, 16),
         "E": (256, 512, 128, 16), "F": (256, 1024, 128, 16)}


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--mixes", default="A,B,C,D,E")
    ap.add_argument("--settings", default="3")
    ap.add_argument("--methods", default="gpfq,gptq-act,rtn")
    ap.add_argument("--out", default="benchmarks/results/calibration_mix.json")
    args = ap.parse_args(argv)
    mixes, methods = args.mixes.split(","), args.methods.split(",")
    for m in methods:
        options(m)
    for x in mixes:
        if x not in MIXES:
            raise SystemExit(f"unknown mix {x!r} (known: {', '.join(MIXES)})")
    model = minilm.build()
    rows, load0 = [], os.getloadavg()
    fp32 = minilm.evaluate(model)
    for x in mixes:
        s, w, p, d = MIXES[x]
        calib = minilm.calibration(s, words=w, phrases=p, documents=d)
        for setting in args.settings.split(","):
            bits = setting if setting == "ternary" else int(setting)
            for method in methods:
                t0 = time.perf_counter()
                res = compress_model(model, calib, bits=bits, progress=False, **options(method))
                secs = time.perf_counter() - t0
                rows.append({"mix": x, "sentences_words_phrases_documents": [s, w, p, d],
                             "spread": spread(as_batches(calib)), "setting": setting, "method": method,
                             "metrics": minilm.evaluate(res.reference), "compress_seconds": secs,
                             "mean_rel_error": sum(r.rel_error for r in res.report) / len(res.report),
                             "mean_weight_rel_error": weight_error(model, res)})
                print(json.dumps({k: rows[-1][k] for k in ("mix", "setting", "method", "metrics")}), flush=True)
                write_text(args.out, json.dumps({"fp32": fp32,
                                                 "load_avg_before": list(load0),
                                                 "load_avg_after": list(os.getloadavg()), "rows": rows}, indent=1))


if __name__ == "__main__":
    main()
