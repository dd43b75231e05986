"""Resume an interrupted compression: the finished layers in a side file next to the output.

After every layer group the layers compressed so far are written (atomically, in the .spfq
format, without float parameters) to the side file, with a key: the sha256 of the settings,
the model's weights and the calibration data. `--resume` loads the layers of a side file with
the same key, applies them to the compressed model instead of recomputing them (the engines
still propagate activations through them), and continues from the first missing group, so the
output is byte-identical to an uninterrupted run. A side file with another key is an error
under --resume (it belongs to another run) and is replaced without it.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import numpy as np
import torch

from ..compressed import CompressedLayer, CompressedModel
from ..errors import SpfqError
from . import calibration as calib

FORMAT = "spfq-deploy/compress-resume 1"


def side_file(output: str | Path) -> Path:
    out = Path(output)
    return out.parent / f".{out.name}.resume"


def run_key(model: torch.nn.Module, batches: list, config: dict) -> str:
    """What makes two runs give the same layers: settings, weights (incl. buffers), calibration."""
    h = hashlib.sha256(json.dumps(config, sort_keys=True, default=str).encode())
    for name, t in sorted(model.state_dict().items()):
        h.update(name.encode())
        h.update(np.ascontiguousarray(t.detach().cpu().numpy()).tobytes())
    for batch in batches:
        for x in ([batch[k] for k in sorted(batch)] if isinstance(batch, dict) else
                  batch if isinstance(batch, tuple) else (batch,)):
            if isinstance(x, torch.Tensor):
                h.update(str((tuple(x.shape), str(x.dtype))).encode())
                h.update(np.ascontiguousarray(x.detach().cpu().numpy()).tobytes())
    h.update(str(calib.count_samples(batches)).encode())
    return h.hexdigest()


class Checkpoint:
    """The side file of one run: restored layers (with their reports) and saving after groups."""

    def __init__(self, path: Path, key: str, resume: bool):
        self.path, self.key = Path(path), key
        self.layers: dict[str, CompressedLayer] = {}
        self.reports: dict[str, dict] = {}
        if resume and self.path.exists():
            self._load()

    def _load(self) -> None:
        from ..pack import container

        try:
            cm = container.load(self.path)
        except Exception as exc:  # noqa: BLE001 - any unreadable side file: say which, one line
            raise SpfqError(f"--resume: {self.path} is not a readable resume file ({exc})") from None
        if cm.meta.get("format") != FORMAT or cm.meta.get("key") != self.key:
            raise SpfqError(f"--resume: {self.path} belongs to another run (other settings, weights or "
                            f"calibration data); remove it or run without --resume")
        self.layers = dict(cm.layers)
        self.reports = dict(cm.meta.get("reports", {}))

    def restored(self, group: list[str]) -> bool:
        return all(n in self.layers and n in self.reports for n in group)

    def save(self, layers: dict[str, CompressedLayer], reports: dict[str, dict]) -> None:
        from ..pack import container

        meta = {"format": FORMAT, "key": self.key, "reports": reports}
        container.save(self.path, CompressedModel(dict(layers), {}, None, meta))

    def remove(self) -> None:
        self.path.unlink(missing_ok=True)
