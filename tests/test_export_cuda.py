"""`spfq-deploy export --target cuda` and `validate --target cuda`.

The export is built with the real nvcc GPU library. On this machine (no GPU) its validate row is
skipped, saying why. The same folder with the host-emulation build of the library swapped in
(same ABI; the kernels' per-lane code on the CPU) runs the whole GPU path of validate: every
compressed layer through the CUDA entry points, per-layer exactness against the integer
reference, top-1 100%; a perturbed GPU layer fails the row and is named as the first diverging
layer. On a GPU machine the test with the real library runs instead of skipping.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np
import pytest

from spfq_deploy.cli import main
from spfq_deploy.export.cuda import library as cuda_library
from spfq_deploy.export.source import file_sha256

LAYERS = ["features.0", "features.3", "classifier.0", "classifier.2"]


@pytest.fixture(scope="module")
def spfq_file(tmp_path_factory) -> Path:
    import examples.mnist_cnn as mnist
    from spfq_deploy.compress import compress_model
    from spfq_deploy.pack import container

    base = tmp_path_factory.mktemp("cuda-export")
    # one layer per GPU layout: ternary (SIGN_MASK), 4-bit 95% pruned (SPARSE), 1-bit (SIGN), 3-bit (PLANES)
    calib = mnist.calibration(64)
    opts = {"features.0": dict(bits="ternary"), "features.3": dict(bits=4, sparsity=0.95),
            "classifier.0": dict(bits=1), "classifier.2": dict(bits=3)}
    res = None
    for name, o in opts.items():
        r = compress_model(mnist.build(), calib, method="rtn", progress=False, model_spec="examples/mnist_cnn.py", **o)
        res = res or r
        res.model.layers[name] = r.model.layers[name]
    container.save(base / "m.spfq", res.model)
    np.savez(base / "digits.npz", input=mnist.load_digits()[0][:16].numpy())
    return base / "m.spfq"


@pytest.fixture(scope="module")
def export_dir(spfq_file, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("cuda-out") / "out"
    rc = main(["export", str(spfq_file), "--target", "cuda", "--format", "onnx", "--flavours", "custom",
               "-o", str(out)])
    assert rc == 0
    return out


def _validate(folder: Path, capsys, *extra):
    js = folder.parent / "report.json"
    rc = main(["validate", str(folder), "--json", str(js), *extra])
    text = capsys.readouterr()
    return rc, text.out, json.loads(js.read_text()) if rc in (0, 1) else None


def _with_emulation(export_dir: Path, tmp_path: Path) -> Path:
    dest = tmp_path / "out"
    shutil.copytree(export_dir, dest)
    lib = dest / "lib" / "cuda" / "libspfq_cuda.so"
    shutil.copyfile(cuda_library.build(emulate=True), lib)
    m = json.loads((dest / "manifest.cuda.json").read_text())
    m["files"]["lib/cuda/libspfq_cuda.so"]["sha256"] = file_sha256(lib)
    (dest / "manifest.cuda.json").write_text(json.dumps(m))
    return dest


def test_export_writes_library_and_manifest(export_dir):
    m = json.loads((export_dir / "manifest.cuda.json").read_text())
    assert m["format"] == "spfq-deploy/cuda-export" and m["target"] == "cuda"
    assert m["library"]["file"] == "lib/cuda/libspfq_cuda.so"
    assert m["library"]["architectures"] == ["sm_80", "sm_90"] and "sm_80 sm_90" in m["library"]["info"]
    assert "uploaded unchanged" in m["gpu_layout"]
    assert list(m["layers"]) == LAYERS
    assert [v["layout"] for v in m["layers"].values()] == ["sign_mask", "sparse", "sign", "planes"]
    for rel, entry in m["files"].items():
        assert file_sha256(export_dir / rel) == entry["sha256"], rel
    # the CPU artifacts are the host's
    onnx_m = json.loads((export_dir / "manifest.json").read_text())
    assert set(onnx_m["custom_op_library"]["files"]) == {"x86_64"}


def test_validate_cuda_row(export_dir, spfq_file, capsys):
    """The real GPU library: ok on a GPU machine, a skip row that says why elsewhere."""
    from spfq_deploy.cuda_runtime import CudaLibrary

    rc, out, report = _validate(export_dir, capsys, "--target", "cuda", "--data", str(spfq_file.parent / "digits.npz"))
    rows = [r for r in report["rows"] if r["target"] == "cuda"]
    assert len(rows) == 1
    why = CudaLibrary(export_dir / "lib/cuda/libspfq_cuda.so").unavailable()
    if why:
        assert rc == 0 and rows[0]["status"] == "skip" and "no CUDA GPU" in rows[0]["note"], rows[0]
    else:  # a GPU is here: real parity
        assert rc == 0 and rows[0]["status"] == "ok", rows[0]
        assert all(x["local_ok"] for x in rows[0]["layers"])


def test_validate_cuda_path_with_emulated_device(export_dir, capsys, tmp_path):
    folder = _with_emulation(export_dir, tmp_path)
    rc, out, report = _validate(folder, capsys, "--target", "cuda")
    assert rc == 0, out
    (row,) = [r for r in report["rows"] if r["target"] == "cuda"]
    assert row["status"] == "ok" and "host emulation" in row["device"], row
    assert row["reference"].startswith("integer reference")
    assert [x["layer"] for x in row["layers"]] == LAYERS
    assert all(x["local_ok"] and x["local_max_rel_err"] <= 2e-5 for x in row["layers"]), row["layers"]
    assert row["metrics"]["top1_agreement"] == 1.0 and row["metrics"]["min_cosine"] > 0.99999
    # reported beside it: the distance to the dequantised float model (int8 activation rounding)
    ref = row["vs_dequantised_model"]
    assert 0.99 < ref["min_cosine"] <= row["metrics"]["min_cosine"] + 1e-9, ref


def test_perturbed_gpu_layer_fails_and_is_named(export_dir, tmp_path, monkeypatch):
    from spfq_deploy import cuda_runtime
    from spfq_deploy.validate import validate

    folder = _with_emulation(export_dir, tmp_path)
    real = cuda_runtime.CudaLayer.forward

    def skewed(self, x):
        y = real(self, x)
        if self.layer.name == "features.3":
            y = y.clone()
            y.view(-1)[0] += 0.5 * float(y.abs().max())
            self.last = (self.last[0], y.numpy().copy())
        return y

    monkeypatch.setattr(cuda_runtime.CudaLayer, "forward", skewed)
    report = validate(folder, targets=["cuda"], log=lambda *a: None)
    (row,) = report["rows"]
    assert row["status"] == "fail" and not report["passed"]
    assert row["first_diverging_layer"] == "features.3", row


def test_replaced_weights_fail_the_cuda_row(export_dir, tmp_path, capsys):
    """The GPU uploads model.spfq, and the reference is rebuilt from it too: a different but valid
    .spfq would agree with itself, so the manifest checksum is what must catch it."""
    import examples.mnist_cnn as mnist
    from spfq_deploy.compress import compress_model
    from spfq_deploy.pack import container

    folder = _with_emulation(export_dir, tmp_path)
    other = compress_model(mnist.build(), mnist.calibration(64), bits=1, method="rtn", progress=False,
                           model_spec="examples/mnist_cnn.py")
    container.save(folder / "model.spfq", other.model)
    rc, out, report = _validate(folder, capsys, "--target", "cuda")
    assert rc == 1, out
    (row,) = [r for r in report["rows"] if r["target"] == "cuda"]
    assert row["status"] == "fail" and any("model.spfq: sha256 differs" in f for f in row["failures"]), row

    # a flipped byte inside the file: the container refuses it, one line, exit 2
    data = bytearray((folder / "model.spfq").read_bytes())
    data[len(data) // 2] ^= 0x10
    (folder / "model.spfq").write_bytes(bytes(data))
    rc = main(["validate", str(folder), "--target", "cuda"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "model.spfq" in err[0], err


def test_missing_nvcc_is_one_line_and_writes_nothing(spfq_file, tmp_path, capsys, monkeypatch):
    tdir = tmp_path / "targets"
    shutil.copytree(Path(__file__).resolve().parents[1] / "targets", tdir)
    toml = tdir / "cuda.toml"
    toml.write_text(toml.read_text().replace('nvcc = "nvcc"', 'nvcc = "nvcc-not-installed"', 1))
    monkeypatch.setenv("SPFQ_TARGETS_DIR", str(tdir))
    monkeypatch.delenv("NVCC", raising=False)
    out = tmp_path / "out"
    rc = main(["export", str(spfq_file), "--target", "cuda", "-o", str(out)])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "nvcc" in err[0] and "Traceback" not in err[0], err
    assert not out.exists()
