"""`spfq-deploy generate`: greedy text generation with an exported decoder, on this host.

The export folder of a decoder (a model file with generation_config(), e.g. examples/smollm2.py)
holds tokenizer.json and generation.json beside the ONNX flavours; this tokenizes the prompt
(BOS first), runs the same greedy loop the device runner has (run_onnx.generate: numpy +
onnxruntime, prefill from an empty KV cache, then one token per run) and reports tokens/s.
"""

from __future__ import annotations

import json
from pathlib import Path

from .errors import SpfqError
from .export.onnx import run_onnx
from .export.onnx.backend import FILES
from .export.onnx.session import session
from .targets import host_target

FLAVOURS = ("custom", "stock")


def host_library(out: Path) -> Path:
    """This host's custom-op library as the folder's manifest.json names it."""
    try:
        manifest = json.loads((out / "manifest.json").read_text())
    except (OSError, ValueError):
        raise SpfqError(f"{out}: no readable manifest.json (not an ONNX export folder of spfq-deploy export)") from None
    host = host_target().name
    lib = (manifest.get("custom_op_library") or {}).get("files", {}).get(host)
    if lib is None:
        raise SpfqError(f"{out}: the export has no custom-op library for this {host} host "
                        f"(export with the custom flavour, or use --flavour stock)")
    return out / lib


def load_generation(out: Path) -> tuple[dict, object]:
    """(generation.json, tokenizers.Tokenizer) of an export folder; SpfqError if it is not a decoder's."""
    gen_path, tok_path = out / "generation.json", out / "tokenizer.json"
    if not (out / "manifest.json").is_file():
        raise SpfqError(f"{out}: no manifest.json (not an ONNX export folder of spfq-deploy export)")
    if not gen_path.is_file() or not tok_path.is_file():
        raise SpfqError(f"{out}: no generation.json / tokenizer.json: the model is not a decoder with "
                        f"generation_config() (generate needs one, e.g. examples/smollm2.py)")
    try:
        import tokenizers
    except ImportError:
        raise SpfqError("generate needs the 'tokenizers' package: pip install tokenizers") from None
    try:
        gen = json.loads(gen_path.read_text())
        tok = tokenizers.Tokenizer.from_file(str(tok_path))
    except Exception as exc:
        raise SpfqError(f"{out}: unreadable generation.json / tokenizer.json ({str(exc).splitlines()[0]})") from None
    return gen, tok


def generate(out_dir, prompt: str, max_new_tokens: int = 64, threads: int = 1, flavour: str = "custom") -> dict:
    """Greedy continuation of ``prompt``: {"text", "prompt_tokens", "generated", prefill/decode timings}."""
    import numpy as np

    out = Path(out_dir)
    if flavour not in FLAVOURS:
        raise SpfqError(f"--flavour {flavour!r}: choose {' or '.join(FLAVOURS)}")
    if max_new_tokens < 1:
        raise SpfqError(f"--max-new-tokens must be >= 1, got {max_new_tokens}")
    gen, tok = load_generation(out)
    model = out / FILES[flavour]
    if not model.is_file():
        raise SpfqError(f"{out}: no {FILES[flavour]} (export with the {flavour} flavour)")
    library = host_library(out) if flavour == "custom" else None
    sess = session(model, library, threads=threads, decoder=True)
    ids = [int(gen["bos_token_id"]), *tok.encode(prompt, add_special_tokens=False).ids]
    res = run_onnx.generate(sess, np.asarray([ids], dtype=np.int64), max_new_tokens, set(gen["eos_token_ids"]))
    res["text"] = tok.decode(res["generated"])
    res.update({"prompt": prompt, "flavour": flavour, "threads": threads})
    return res
