"""The C column loop of path following (compress/native.py, kernels/src/path_following.c)
against the Python reference (path_following.gram_path_following with alphabet.quantize).

Bit-identical codes and values for every alphabet (binary, ternary, b-bit; pruned; nearest
and stochastic), grouped layers, candidate axes, odd block sizes, and any thread count; the
q'Hq the kernel sums agrees with the matmul; a whole model compressed through the reference
loop gives the same codes as through the kernel.
"""

from __future__ import annotations

import sys
from pathlib import Path

import numpy as np
import pytest
import torch

from spfq_deploy.compress import compress_model, native
from spfq_deploy.compress.alphabet import Alphabet, make_alphabet, quantize
from spfq_deploy.compress.config import CompressConfig
from spfq_deploy.compress.path_following import align, gram_path_following, quantizing_step
from spfq_deploy.errors import SpfqError

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT))


def _layer(g, n, d, m=300, seed=0):
    gen = torch.Generator().manual_seed(seed)
    X = torch.randn(g, m, d, generator=gen, dtype=torch.float64)
    Xt = X + 0.2 * torch.randn(g, m, d, generator=gen, dtype=torch.float64)
    X[..., 3] = 0.0  # an all-zero input column: H_tt = 0, z_t = 0
    Xt[..., 3] = 0.0
    W = torch.randn(g, n, d, generator=gen, dtype=torch.float64)
    return W, Xt.mT @ X, Xt.mT @ Xt, torch.rand(W.shape, generator=gen, dtype=torch.float64)


def reference(W, G, H, alph, U, block, shape, A=None, per_column=False):
    """The Python loop the kernel replaces: (codes, Q, q'Hq by matmul); it makes its own A
    (the caller's prepared one is ignored). per_column: alph's lam / delta are one per column
    (group-wise scales), column t rounds on its own."""
    codes = torch.zeros(shape, dtype=torch.int8)
    if per_column:
        def step(z, t):
            a_t = Alphabet(alph.alphabet, alph.bits, alph.delta[..., t], alph.lam[..., t], alph.pruned)
            c = quantize(z, a_t, U is not None, None if U is None else U[..., t])
            codes[..., t] = c
            return a_t.values(c)
        Q = gram_path_following(W, G, H, step, block, shape)
        return codes, Q, ((Q @ H) * Q).sum(-1)
    quant = (lambda z, t: quantize(z, alph, True, U[..., t])) if U is not None else (lambda z, t: quantize(z, alph, False))
    Q = gram_path_following(W, G, H, quantizing_step(quant, alph.values, codes), block, shape)
    return codes, Q, ((Q @ H) * Q).sum(-1)


CASES = [("int", 4, 0.0), ("int", 3, 0.5), ("int", 8, 0.0), ("binary", 1, 0.0), ("binary", 1, 0.4),
         ("ternary", 2, 0.0), ("ternary", 2, 0.5)]


@pytest.mark.parametrize("alphabet,bits,sparsity", CASES)
@pytest.mark.parametrize("stochastic", [False, True])
def test_codes_and_values_bit_identical_to_the_reference(alphabet, bits, sparsity, stochastic):
    W, G, H, U = _layer(g=3, n=21, d=70, seed=bits)
    Cs = torch.tensor([0.3, 0.9, 1.7], dtype=torch.float64)
    f = torch.tensor([1.2, 2.0, 3.0], dtype=torch.float64) if sparsity else None
    alph = make_alphabet(alphabet, bits, W, Cs, lam_factor=f, sparsity=sparsity)
    shape = (3,) + W.shape
    u = U if stochastic else None
    for block in (1, 16, 33, 128):
        want = reference(W, G, H, alph, u, block, shape)
        A = native.prepare(W, G) if block % 2 else None  # the candidate-independent GEMM made by the caller
        got = native.path_following(W, G, H, alph, u, block, shape, A=A)
        assert torch.equal(got[0], want[0]), f"codes differ at block {block}"
        assert torch.equal(got[1], want[1]), f"values differ at block {block}"
        torch.testing.assert_close(got[2], want[2], rtol=1e-10, atol=1e-10 * float(want[2].abs().max()))
    assert 0 < int((got[0] != 0).sum()) < got[0].numel() or alphabet == "binary"  # a real mix of levels


def test_identity_pass_and_alignment_match_the_reference():
    W, G, H, _ = _layer(g=2, n=9, d=50)
    Q = gram_path_following(W, G, H, lambda z, t: z, 16)
    codes, got, _ = native.path_following(W, G, H, None, None, 16)
    assert codes is None and torch.equal(got, Q)
    assert align(W, G, H, 1, 16).equal(Q)


def test_thread_count_does_not_change_the_result():
    W, G, H, U = _layer(g=1, n=257, d=90)
    alph = make_alphabet("int", 4, W, torch.tensor([0.5, 1.0], dtype=torch.float64))
    threads = torch.get_num_threads()
    try:
        outs = []
        for t in (1, 2, 3):
            torch.set_num_threads(t)
            outs.append(native.path_following(W, G, H, alph, U, 64, (2,) + W.shape))
    finally:
        torch.set_num_threads(threads)
    for o in outs[1:]:
        assert all(torch.equal(a, b) for a, b in zip(o, outs[0]))


def test_block_above_the_kernel_limit_is_refused():
    with pytest.raises(SpfqError, match="block must be at most 4096"):
        CompressConfig(block=5000)


def test_model_codes_equal_through_the_reference_loop(monkeypatch):
    """The MNIST CNN, 4-bit and 1-bit, and 4-bit with groups of 32 columns: the kernel (with its summed q'Hq choosing C) against the
    Python loop with the matmul error: the same codes (>= 99.9% allowed, all equal here)."""
    import examples.mnist_cnn as mnist

    model, calib = mnist.build(), mnist.calibration(128)
    for bits, group in ((4, 0), (1, 0), (4, 32)):
        fast = compress_model(model, calib, bits=bits, method="gpfq", group_size=group, progress=False).model.layers
        with monkeypatch.context() as m:
            m.setattr(native, "path_following", reference)
            slow = compress_model(model, calib, bits=bits, method="gpfq", group_size=group,
                                  progress=False).model.layers
        equal = sum(int((fast[k].codes == slow[k].codes).sum()) for k in fast)
        total = sum(fast[k].codes.size for k in fast)
        assert equal / total >= 0.999, f"{bits}-bit: {equal / total:.5f} of the codes equal"
        assert all(np.array_equal(fast[k].scale, slow[k].scale) for k in fast)
