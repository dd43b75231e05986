"""Error metrics of an artifact's outputs against a reference's (numpy in, floats out)."""

from __future__ import annotations

import numpy as np

MAX_CLASSES = 1000


def is_classifier(ref: np.ndarray, name: str = "") -> bool:
    """Logits: a 2-D (batch, classes) output with 2..1000 columns whose name does not say it is
    an embedding (MiniLM's 'embedding' is (batch, 384) and has no top-1)."""
    return ref.ndim == 2 and 2 <= ref.shape[1] <= MAX_CLASSES and "embed" not in name.lower()


def _rows(a: np.ndarray) -> np.ndarray:
    a = np.asarray(a, dtype=np.float64)
    return a.reshape(len(a), -1) if a.ndim > 1 else a.reshape(1, -1)


def cosine_rows(got, ref) -> np.ndarray:
    """Cosine similarity per sample (row along the first axis); two zero rows count as 1."""
    a, b = _rows(got), _rows(ref)
    na, nb = np.linalg.norm(a, axis=1), np.linalg.norm(b, axis=1)
    dot = (a * b).sum(1)
    with np.errstate(invalid="ignore", divide="ignore"):
        cos = np.where((na == 0) & (nb == 0), 1.0, dot / (na * nb))
    return np.nan_to_num(cos, nan=-1.0)


def compare(got, ref, classifier: bool = False) -> dict:
    """max abs err, max rel err (= max abs err / max |ref|), min cosine over samples, SNR in dB
    (10 log10 sum ref^2 / sum (got - ref)^2; inf when equal), top-1 agreement for classifiers."""
    got, ref = np.asarray(got), np.asarray(ref)
    if got.shape != ref.shape:
        raise ValueError(f"output shape {tuple(got.shape)} differs from the reference's {tuple(ref.shape)}")
    a, b = got.astype(np.float64), ref.astype(np.float64)
    if not np.isfinite(a).all():
        return {"max_abs_err": float("inf"), "max_rel_err": float("inf"), "min_cosine": -1.0,
                "snr_db": float("-inf"), **({"top1_agreement": 0.0} if classifier else {})}
    err = np.abs(a - b)
    scale = float(np.abs(b).max()) if b.size else 0.0
    noise, signal = float((err ** 2).sum()), float((b ** 2).sum())
    out = {"max_abs_err": float(err.max()) if err.size else 0.0,
           "max_rel_err": float(err.max() / scale) if scale > 0 else (0.0 if not err.size or err.max() == 0 else float("inf")),
           "min_cosine": float(cosine_rows(a, b).min()) if a.size else 1.0,
           "snr_db": float(10 * np.log10(signal / noise)) if noise > 0 else float("inf")}
    if classifier:
        out["top1_agreement"] = float((a.argmax(1) == b.argmax(1)).mean())
    return out


def worst(results: list[dict]) -> dict:
    """Several outputs' metrics folded into the worst of each."""
    out = {}
    for r in results:
        for k, v in r.items():
            if k in ("max_abs_err", "max_rel_err"):
                out[k] = max(out.get(k, v), v)
            else:
                out[k] = min(out.get(k, v), v)
    return out
