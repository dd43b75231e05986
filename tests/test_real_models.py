"""Real pretrained models on real data (WORKLOADS.md): quality gauges that can fail, and the
packed size of 1-bit MiniLM layers. Thresholds sit a little below what the benchmark measures
(benchmarks/results/quality.json) so they catch regressions, not noise."""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

import examples.minilm as minilm
import examples.mnist_cnn as mnist
from spfq_deploy.compress import compress_model
from spfq_deploy.compressed import CompressedLayer
from spfq_deploy.pack import container, storage_report
from spfq_deploy.reference import load_reference


@pytest.fixture(scope="module")
def mnist_setup():
    return mnist.build(), mnist.calibration(256)


@pytest.mark.parametrize("bits,sparsity,min_acc", [(4, 0.0, 0.997), (1, 0.0, 0.94), (4, 0.5, 0.99)])
def test_mnist_gpfq_accuracy_and_beats_rtn(mnist_setup, bits, sparsity, min_acc):
    model, calib = mnist_setup
    gp = compress_model(model, calib, bits=bits, sparsity=sparsity, method="gpfq", progress=False)
    rtn = compress_model(model, calib, bits=bits, sparsity=sparsity, method="rtn", progress=False)
    acc = mnist.evaluate(gp.reference)["accuracy"]
    assert acc >= min_acc, acc
    gp_err = {r.name: r.rel_error for r in gp.report}
    for r in rtn.report:  # path following beats plain rounding on every layer's output error
        assert gp_err[r.name] < r.rel_error, (r.name, gp_err[r.name], r.rel_error)


def test_mnist_file_round_trip_keeps_accuracy(mnist_setup, tmp_path):
    model, calib = mnist_setup
    res = compress_model(model, calib, bits=1, method="gpfq", progress=False,
                         model_spec="examples/mnist_cnn.py")
    container.save(tmp_path / "m.spfq", res.model)
    x, _ = mnist.load_digits()
    with torch.no_grad():
        assert torch.equal(load_reference(tmp_path / "m.spfq")(x[:256]), res.reference(x[:256]))


def test_minilm_first_block_4bit_keeps_embeddings():
    model = minilm.build()
    calib = minilm.calibration(64)
    res = compress_model(model, calib, bits=4, method="gpfq", include=["layers.0.*"], progress=False)
    assert sorted(r.name for r in res.report) == sorted(
        f"layers.0.{p}" for p in ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.up", "ffn.down"))
    texts = minilm.calibration_sentences(300)[256:300]  # sentences not used for calibration
    a = minilm.encode(model, texts)
    b = minilm.encode(res.reference, texts)
    cos = (a * b).sum(1)  # unit vectors; measured mean 0.992, min 0.985 with 64 sentences
    assert cos.mean() > 0.99 and cos.min() > 0.975, (cos.mean(), cos.min())
    assert max(r.rel_error for r in res.report) < 0.15


def test_minilm_1bit_linear_layers_pack_under_1_05_bits():
    model = minilm.build()
    total_bits = total_w = 0
    rng = np.random.default_rng(0)
    for name, mod in model.named_modules():
        if isinstance(mod, nn.Linear):
            n, d = mod.weight.shape
            layer = CompressedLayer(name, "linear", (n, d), "binary", 1,
                                    rng.choice(np.array([-1, 1], np.int8), size=(n, d)),
                                    np.full(n, 0.01, np.float32))
            rep = storage_report(layer)
            total_bits += rep["total_bits"]
            total_w += rep["weights"]
    assert total_w == 6 * (4 * 384 * 384 + 2 * 384 * 1536)  # the 36 Linear layers
    assert total_bits / total_w <= 1.05, total_bits / total_w
