"""validate.decode's rule for greedy tokens (the decoding itself is tested on SmolLM2's cut in
test_smollm2.py): a token may differ from the reference's only at a near tie."""

from __future__ import annotations

import numpy as np

from spfq_deploy.validate import decode


def _logits(top: int, gap: float, n: int = 10) -> np.ndarray:
    v = np.zeros(n, np.float32)
    v[top], v[(top + 1) % n] = 5.0, 5.0 - gap
    return v


def test_host_rule_allows_a_flip_only_within_twice_the_error():
    ref = [_logits(1, 0.5), _logits(2, 1e-4)]
    ref_tokens = [1, 2]
    tie = [ref[0].copy(), ref[1].copy()]
    tie[1][3] += 2e-4  # the artifact's own error (2e-4) lifts the runner-up over a 1e-4 gap
    entry, fails = decode.check(ref_tokens, ref, [1, 3], tie)
    assert not fails and entry["token_agreement"] == 0.5
    # a token that differs where the reference's gap (0.5) is far above the error (here 0)
    entry, fails = decode.check(ref_tokens, ref, [2, 2], [ref[0].copy(), ref[1].copy()])
    assert fails and "decode step 0" in fails[0] and "top-2 gap" in fails[0]


def test_qemu_rule_looks_at_the_first_difference_only():
    ref = [_logits(1, 0.5), _logits(2, 0.5), _logits(4, 0.5)]
    entry, fails = decode.check([1, 2, 4], ref, [1, 2, 4])
    assert not fails and entry["token_agreement"] == 1.0
    entry, fails = decode.check([1, 2, 4], ref, [1, 7, 9])
    assert entry["first_difference"] == 1 and fails and "decode step 1" in fails[0]
    near = [ref[0], _logits(2, 1e-4), ref[2]]
    entry, fails = decode.check([1, 2, 4], near, [1, 3, 9])
    assert not fails and entry["first_difference"] == 1
    _, fails = decode.check([1, 2, 4], ref, [1, 2])
    assert fails == ["decode: 2 tokens generated, 3 expected"]
