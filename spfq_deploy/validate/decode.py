"""Decoders (a folder with generation.json and a KV-cache graph): greedy decoding through each ONNX
artifact against the reference, STEPS tokens after a prompt of BOS + the inputs' first input_ids
row, from an empty cache (prefill), then one token and the cache per run.

Reference: the row's reference model (dequantised or integer) run the same way in PyTorch, its
own greedy tokens. On the host (ONNX flavours and the TVM library) the artifact is fed the
reference's tokens (teacher forcing), so each step's logits are compared with the reference's
(the row's tolerance) and the greedy token agreement is counted on the same prefixes; under
qemu-aarch64 the folder's run_onnx.py --generate runs free (its tokens come back, not its logits)
and its tokens are compared with the reference's (the TVM library under qemu: not decoded; its
one forward with the inputs' cache is checked as for any model). A greedy token may differ only where the reference's top-2 logits are closer than
the artifact's error can move them (a near tie: 2 x the step's max abs error on the host,
NEAR_TIE x max |logit| under qemu); anything else fails the row.
"""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import torch

from . import metrics

STEPS = 8
NEAR_TIE = 1e-3  # under qemu (no artifact logits): relative top-2 gap that counts as a tie
PAST = "past_key_values."


def prompt(out: Path, names: list[str], feeds: dict) -> list[int] | None:
    """BOS + the first input_ids row, or None when the folder is not a decoder export."""
    gen = out / "generation.json"
    if not gen.is_file() or "input_ids" not in names or not any(n.startswith(PAST) for n in names):
        return None
    try:
        bos = int(json.loads(gen.read_text())["bos_token_id"])
    except (OSError, ValueError, KeyError, TypeError):
        return None
    return [bos, *np.asarray(feeds["input_ids"])[0].astype(np.int64).tolist()]


def reference(model, ids: list[int], steps: int = STEPS) -> tuple[list[int], list[np.ndarray]]:
    """The reference's greedy tokens and the logits each was chosen from (last position)."""
    tokens, logits = [], []
    with torch.no_grad():
        out = model(torch.tensor([ids], dtype=torch.int64))
        for step in range(steps):
            last = out[0][0, -1].detach().numpy().astype(np.float32)
            logits.append(last)
            tokens.append(int(np.argmax(last)))
            if step < steps - 1:
                out = model(torch.tensor([[tokens[-1]]], dtype=torch.int64), *out[1:])
    return tokens, logits


def teacher_forced(run, past_names: list[str], feeds: dict, ids: list[int], tokens: list[int]) -> list[np.ndarray]:
    """An artifact's last-position logits at each step, fed the reference's tokens. run(feeds) ->
    [logits, *present] (present in the order of past_names, as the exports write them); the empty
    cache takes its head counts and sizes from the validation feeds."""
    cache = {n: np.zeros((1, feeds[n].shape[1], 0, *feeds[n].shape[3:]), np.float32) for n in past_names}
    outs = run({"input_ids": np.asarray([ids], np.int64), **cache})
    logits = [np.asarray(outs[0])[0, -1]]
    for t in tokens[:-1]:
        outs = run({"input_ids": np.array([[t]], np.int64), **dict(zip(past_names, outs[1:]))})
        logits.append(np.asarray(outs[0])[0, -1])
    return logits


def _gap(logits: np.ndarray) -> float:
    top = np.sort(logits.astype(np.float64))[-2:]
    return float(top[1] - top[0])


def check(ref_tokens: list[int], ref_logits: list[np.ndarray], got_tokens: list[int],
          got_logits: list[np.ndarray] | None = None) -> tuple[dict, list[str]]:
    """(the row's "decode" entry, failures). got_logits: the host's teacher-forced logits."""
    n = len(ref_tokens)
    agree = [int(g == r) for g, r in zip(got_tokens, ref_tokens)]
    entry = {"steps": n, "tokens": got_tokens, "reference_tokens": ref_tokens,
             "token_agreement": float(sum(agree)) / n if n else 1.0}
    fails = []
    if got_logits is not None:
        per_step = [metrics.compare(g, r) for g, r in zip(got_logits, ref_logits)]
        entry["metrics"] = metrics.worst(per_step)
        for i, ok in enumerate(agree):
            if not ok and _gap(ref_logits[i]) > 2 * per_step[i]["max_abs_err"]:
                fails.append(f"decode step {i}: greedy token {got_tokens[i]} != reference {ref_tokens[i]} "
                             f"(top-2 gap {_gap(ref_logits[i]):.3g} > 2 x max abs err {per_step[i]['max_abs_err']:.3g})")
        return entry, fails
    first = next((i for i, ok in enumerate(agree) if not ok), None)  # free-running: later steps differ anyway
    if len(got_tokens) != n:
        fails.append(f"decode: {len(got_tokens)} tokens generated, {n} expected")
    elif first is not None:
        gap, scale = _gap(ref_logits[first]), float(np.abs(ref_logits[first]).max())
        entry["first_difference"] = first
        if gap > NEAR_TIE * scale:
            fails.append(f"decode step {first}: greedy token {got_tokens[first]} != reference {ref_tokens[first]} "
                         f"(top-2 gap {gap:.3g} > {NEAR_TIE:g} x max |logit|)")
    return entry, fails
