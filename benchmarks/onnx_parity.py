"""Parity of the ONNX flavours with the references, on real data (until `validate` exists).

    python benchmarks/onnx_parity.py MNIST.spfq MINILM.spfq --out benchmarks/results/onnx_parity.json

MNIST CNN: the first 512 real digits; MiniLM: 32 real sentences (padded batch). References: the
dequantised PyTorch model (float flavours) and the int8-activation reference (custom ops with
int8 activations). Reports max abs error, min cosine per sample, and top-1 agreement (MNIST).
"""

from __future__ import annotations

import argparse
import json
import sys
import tempfile
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import examples.minilm as minilm  # noqa: E402
import examples.mnist_cnn as mnist  # noqa: E402
from spfq_deploy.atomic import write_text  # noqa: E402
from spfq_deploy.export import export  # noqa: E402
from spfq_deploy.export.onnx.session import run_qonnx, session  # noqa: E402
from spfq_deploy.pack import container  # noqa: E402
from spfq_deploy.reference import int8_activation_reference, load_reference  # noqa: E402


def compare(y, ref) -> dict:
    a, b = y.reshape(len(y), -1).astype(np.float64), ref.reshape(len(ref), -1).astype(np.float64)
    cos = (a * b).sum(1) / np.linalg.norm(a, axis=1) / np.linalg.norm(b, axis=1)
    out = {"max_abs_err": float(np.abs(a - b).max()), "min_cosine": float(cos.min())}
    if y.ndim == 2 and y.shape[1] == 10:
        out["top1_agreement"] = float((y.argmax(1) == ref.argmax(1)).mean())
    return out


def run(spfq: Path, feeds: dict, work: Path, log) -> dict:
    out8, outf = work / "int8", work / "float"
    export(spfq, out8, log=lambda *a: None)
    export(spfq, outf, activations="float", flavours=("custom",), log=lambda *a: None)
    lib = out8 / "lib" / "x86_64" / "libspfq_ort.so"
    cm = container.load(spfq)
    ref = load_reference(spfq)
    args = [torch.from_numpy(v) for v in feeds.values()]
    with torch.no_grad():
        yf = ref(*args).numpy()
        y8 = int8_activation_reference(ref, cm)(*args).numpy()
    res = {
        "custom_int8_vs_int8_reference": compare(session(out8 / "model.spfq.onnx", lib).run(None, feeds)[0], y8),
        "custom_int8_vs_float_reference": compare(session(out8 / "model.spfq.onnx", lib).run(None, feeds)[0], yf),
        "int8_reference_vs_float_reference": compare(y8, yf),
        "custom_float": compare(session(outf / "model.spfq.onnx", lib).run(None, feeds)[0], yf),
        "stock_acc0": compare(session(out8 / "model.stock.onnx", accuracy_level=0).run(None, feeds)[0], yf),
        "stock_acc4": compare(session(out8 / "model.stock.onnx", accuracy_level=4).run(None, feeds)[0], yf),
    }
    small = {k: v[:8] for k, v in feeds.items()}
    res["qonnx (8 samples)"] = compare(run_qonnx(out8 / "model.qonnx.onnx", small)[0], yf[:8])
    for k, v in res.items():
        log(f"{spfq.name:28s} {k:34s} " + "  ".join(f"{a} {b:.6g}" for a, b in v.items()))
    return res


def main(argv=None):
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("mnist_spfq", type=Path)
    ap.add_argument("minilm_spfq", type=Path)
    ap.add_argument("--out", default="benchmarks/results/onnx_parity.json")
    args = ap.parse_args(argv)
    digits = mnist.load_digits()[0][:512].numpy()
    ids, mask = minilm.pad_batch(minilm._token_ids(minilm.calibration_sentences(300)[-32:]))
    with tempfile.TemporaryDirectory() as tmp:
        doc = {"mnist": {"file": str(args.mnist_spfq), "samples": 512,
                         **run(args.mnist_spfq, {"input": digits}, Path(tmp) / "a", print)},
               "minilm": {"file": str(args.minilm_spfq), "samples": 32,
                          **run(args.minilm_spfq, {"input_ids": ids.numpy(), "attention_mask": mask.numpy()},
                                Path(tmp) / "b", print)}}
    Path(args.out).parent.mkdir(parents=True, exist_ok=True)
    write_text(args.out, json.dumps(doc, indent=1))


if __name__ == "__main__":
    main()
