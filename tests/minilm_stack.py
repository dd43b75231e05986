"""all-MiniLM-L6-v2 truncated to its first LAYERS encoder layers, with the real pretrained weights
(examples/minilm.py: embeddings, the first layers, mean pooling, L2 normalisation).

The TVM export tests run it under qemu-aarch64, where the full 6-layer encoder would be slow;
two layers still hold every op the encoder has (12 compressed Linear layers: q/k/v/o, up, down).
Model-file conventions as examples/minilm.py: build(), calibration(), export_inputs().
"""

from __future__ import annotations

import sys
from pathlib import Path

from torch import nn

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))

import examples.minilm as ml  # noqa: E402

LAYERS = 2


def build() -> nn.Module:
    model = ml.build()
    model.layers = nn.ModuleList(list(model.layers)[:LAYERS])
    return model.eval()


def calibration(n: int = 16, max_batch: int = 64):
    return ml.calibration(n, max_batch)


def export_inputs() -> dict:
    return ml.export_inputs()


def sentences(n: int = 8) -> list[str]:
    """Real sentences the export was not traced with (other lengths: dynamic batch / sequence)."""
    return ml.calibration_sentences(40)[30:30 + n]


def feeds(n: int = 8) -> dict:
    ids, mask = ml.pad_batch(ml._token_ids(sentences(n)))
    return {"input_ids": ids.numpy(), "attention_mask": mask.numpy()}
