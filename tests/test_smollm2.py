"""The SmolLM2 decoder (issue 17, examples/smollm2.py): the GGUF reference, its tokenizer, the KV
cache, llama-perplexity's chunking, and the 2-layer cut through compress -> export (KV cache in
and out) -> generate, greedy tokens against the PyTorch reference of the same compressed model."""

from __future__ import annotations

import json
import warnings

import numpy as np
import pytest
import torch

import examples.smollm2 as smollm2
from spfq_deploy.cli import main
from spfq_deploy.compress import CompressConfig, compress_model
from spfq_deploy.export import export
from spfq_deploy.generate import generate
from spfq_deploy.pack import container

pytestmark = pytest.mark.slow


@pytest.fixture(scope="module")
def cut_model():
    return smollm2.cut()


def _greedy(model, ids: list[int], steps: int) -> list[int]:
    """Greedy decoding in PyTorch with the model's own KV cache."""
    out, new = None, []
    with torch.no_grad():
        out = model(torch.tensor([ids]))
        for _ in range(steps):
            t = int(out[0][0, -1].argmax())
            new.append(t)
            out = model(torch.tensor([[t]]), *out[1:])
    return new


def test_tokenizer_splits_digits_and_round_trips():
    text = "In 1603, Hamlet said: 'To be, or not to be'."
    ids = smollm2.encode_text(text)
    tok = smollm2.tokenizer()
    assert tok.decode(ids) == text
    pieces = [tok.id_to_token(i) for i in ids]
    assert [p for p in pieces if p.isdigit()] == ["1", "6", "0", "3"]  # smollm pre-tokenizer: one digit each
    assert smollm2.encode_text("<|im_start|>") == [smollm2.BOS]  # control tokens are not split


def test_unpermute_inverts_llama_cpp_rope_permutation():
    """GGUF Q/K rows are HF rows permuted per head as (half, pair) -> (pair, half); _unpermute undoes it."""
    heads, head_dim, cols = 3, 8, 5
    hf = np.arange(heads * head_dim * cols, dtype=np.float32).reshape(heads * head_dim, cols)
    gguf = hf.reshape(heads, 2, head_dim // 2, cols).swapaxes(1, 2).reshape(hf.shape)
    assert not np.array_equal(gguf, hf)
    assert np.array_equal(smollm2._unpermute(gguf, heads), hf)


def test_reference_model_knows_a_fact():
    """The dequantised fp32 reference is a working language model (real weights, real tokenizer)."""
    model = smollm2.build()
    ids = [smollm2.BOS, *smollm2.encode_text("The capital of France is")]
    assert smollm2.tokenizer().decode(_greedy(model, ids, 1)) == " Paris"


def test_kv_cache_equals_the_full_forward(cut_model):
    x = smollm2.held_out_chunks(2, 64)
    with torch.no_grad():
        full = cut_model(x)
        head = cut_model(x[:, :40])
        tail = cut_model(x[:, 40:], *head[1:])
    assert len(tail) == 1 + 2 * 2
    assert tail[1].shape == (2, 3, 64, 64)  # (batch, KV heads, past + new, head dim)
    torch.testing.assert_close(tail[0], full[0][:, 40:], rtol=1e-4, atol=1e-4)
    for a, b in zip(tail[1:], full[1:]):
        torch.testing.assert_close(a, b, rtol=1e-5, atol=1e-5)


def test_held_out_chunks_follow_llama_perplexity():
    """Consecutive CONTEXT-token slices of [BOS] + tokens(held-out text), first token -> BOS."""
    chunks = smollm2.held_out_chunks(3, 128)
    ids = [smollm2.BOS, *smollm2.encode_text(smollm2.held_out_text())]
    assert chunks.shape == (3, 128) and (chunks[:, 0] == smollm2.BOS).all()
    for i in range(3):
        assert chunks[i, 1:].tolist() == ids[i * 128 + 1:(i + 1) * 128]


def test_calibration_windows_are_deterministic_and_cover_short_and_long():
    a, b = smollm2.calibration(12), smollm2.calibration(12)
    assert all(torch.equal(x, y) for x, y in zip(a, b)) and len(a) == len(b)
    assert sorted({x.shape[1] for x in a}) == [32, 64, 128, 256, 512]
    assert sum(x.shape[0] for x in a) == 12 and all((x[:, 0] == smollm2.BOS).all() for x in a)
    held, calib = smollm2.held_out_text(), smollm2.calibration_text()
    assert len(calib) >= 30 and not any(play in held or held in play for play in calib)


@pytest.fixture(scope="module")
def cut_export(cut_model, tmp_path_factory):
    """The 2-layer cut, 4-bit gpfq with lm_head at 8 bits, exported with float activations."""
    with warnings.catch_warnings():
        warnings.simplefilter("ignore")  # 10 windows (2,200 tokens): few samples, as the warning says
        res = compress_model(cut_model, smollm2.calibration(10), CompressConfig(bits=4, layer_bits={"lm_head": 8}),
                             progress=False, model_spec="examples/smollm2.py:cut")
    d = tmp_path_factory.mktemp("smollm2")
    container.save(d / "cut.spfq", res.model)
    export(d / "cut.spfq", d / "out", formats=("onnx",), flavours=("custom", "stock"), activations="float",
           log=lambda *a: None)
    return res, d / "out"


def test_export_writes_a_decoder_with_a_kv_cache(cut_export):
    import onnx

    _, out = cut_export
    g = onnx.load(str(out / "model.spfq.onnx"), load_external_data=False).graph
    names = [i.name for i in g.input]
    assert names == ["input_ids"] + [f"past_key_values.{i}.{kv}" for i in range(2) for kv in ("key", "value")]
    assert [o.name for o in g.output][:2] == ["logits", "present.0.key"]
    dims = [d.dim_param or d.dim_value for d in g.input[1].type.tensor_type.shape.dim]
    assert dims == ["batch", 3, "past_sequence", 64]
    gen = json.loads((out / "generation.json").read_text())
    assert gen == {"bos_token_id": smollm2.BOS, "eos_token_ids": [0, 2]}
    manifest = json.loads((out / "manifest.json").read_text())
    assert {"generation.json", "tokenizer.json"} <= set(manifest["files"])


@pytest.mark.parametrize("flavour", ["custom", "stock"])
def test_generate_matches_the_pytorch_reference_greedily(cut_export, flavour):
    res, out = cut_export
    prompt = "To be, or not to be"
    got = generate(out, prompt, max_new_tokens=12, flavour=flavour)
    want = _greedy(res.reference, [smollm2.BOS, *smollm2.encode_text(prompt)], 12)
    assert got["generated"] == want
    assert got["text"] == smollm2.tokenizer().decode(want)
    assert got["prompt_tokens"] == 1 + len(smollm2.encode_text(prompt)) and got["decode_tokens_per_second"] > 0


def test_generate_cli_prints_text_and_rate(cut_export, capsys):
    _, out = cut_export
    assert main(["generate", str(out), "--prompt", "Good night, sweet prince", "--max-new-tokens", "4"]) == 0
    text = capsys.readouterr().out
    assert text.startswith("Good night, sweet prince") and "tokens/s (custom, 1 thread)" in text


def test_generate_refuses_a_folder_without_a_decoder(tmp_path, capsys):
    (tmp_path / "manifest.json").write_text("{}")
    code = main(["generate", str(tmp_path), "--prompt", "x"])
    err = capsys.readouterr().err
    assert code == 2 and "not a decoder" in err and len(err.strip().splitlines()) == 1


def test_validate_decodes_greedily_against_the_reference(cut_export):
    """validate on a decoder folder: every ONNX row also decodes 8 greedy steps (host: fed the
    reference's tokens, each step's logits within the row's tolerance) and counts the tokens equal
    to the reference's."""
    from spfq_deploy.validate import core

    _, out = cut_export
    rep = core.validate(out, targets=["x86_64"])
    rows = [r for r in rep["rows"] if r["status"] != "skip"]
    assert {r["artifact"].split(",")[0] for r in rows} >= {"onnx custom ops", "onnx stock"}
    for r in rows:
        d = r["decode"]
        assert d["steps"] == 8 and len(d["tokens"]) == 8 and len(d["reference_tokens"]) == 8
        if r["status"] == "ok":
            assert d["token_agreement"] == 1.0 and d["metrics"]["max_rel_err"] <= 1e-4, r
    assert rep["passed"]


def test_arm64_decodes_like_the_reference_under_qemu(cut_export, tmp_path):
    """The cut exported for arm64 (custom ops, int8 activations): validate runs the folder's
    run_onnx.py --generate under qemu-aarch64 (the device's own loop) and its 8 greedy tokens equal
    the integer reference's."""
    from spfq_deploy.validate import core

    _, out = cut_export
    export(out / "model.spfq", tmp_path / "arm", formats=("onnx",), flavours=("custom",), activations="int8",
           target="arm64", log=lambda *a: None)
    rep = core.validate(tmp_path / "arm", targets=["arm64"])
    (row,) = [r for r in rep["rows"] if r["target"] == "arm64" and r["status"] != "skip"]
    assert row["status"] == "ok" and "qemu" in row["artifact"], row
    assert row["decode"]["token_agreement"] == 1.0 and row["decode"]["tokens"] == row["decode"]["reference_tokens"]


def test_tvm_library_decodes_with_the_cache(cut_export, tmp_path):
    """The cut as a TVM library for the host (int8 activations): one Relax function over dynamic
    batch, sequence and past length (torch.export's specs follow forward(input_ids, *past)),
    compiled without operator fusion where TVM's FuseTIR fails on the cache's symbolic shapes;
    validate's 8 greedy steps (prefill from an empty cache, then one token per call) match the
    integer reference, each step's logits within tolerance (softmax over a symbolic length was
    1-4% off with the row schedule before)."""
    from spfq_deploy.validate import core

    _, out = cut_export
    logs = []
    export(out / "model.spfq", tmp_path / "tvm", formats=("tvm",), activations="int8", log=logs.append)
    assert not any("fixed shapes" in line for line in logs), logs
    rep = core.validate(tmp_path / "tvm", targets=["x86_64"])
    (row,) = [r for r in rep["rows"] if r["target"] == "x86_64"]
    assert row["status"] == "ok", row
    d = row["decode"]
    assert d["token_agreement"] == 1.0 and d["metrics"]["max_rel_err"] < 1e-5, d
