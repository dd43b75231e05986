"""`spfq-deploy export` against hostile or unlucky input (issue 12): the user's files are never
deleted, a failed or interrupted export leaves nothing behind, two exports racing for one folder
cannot both win, and a target is a name in targets/ or an explicit --target-file."""

from __future__ import annotations

import hashlib
import json
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spfq_deploy import atomic
from spfq_deploy.cli import main
from spfq_deploy.export.onnx import backend as onnx_backend
from spfq_deploy.export.tvm import compile as tvm_compile

ROOT = Path(__file__).resolve().parents[1]
FAST = ["--format", "onnx", "--flavours", "stock"]  # the quickest complete export


def _cli(*args, cwd=ROOT, env=None):
    return subprocess.run([sys.executable, "-m", "spfq_deploy.cli", *map(str, args)], capture_output=True,
                          text=True, cwd=cwd, env=dict(os.environ, **(env or {})))


def _one_line_error(stderr: str) -> str:
    lines = stderr.strip().splitlines()
    assert len(lines) == 1 and lines[0].startswith("spfq-deploy: error: "), stderr
    assert "Traceback" not in stderr
    return lines[0]


def _tree(folder: Path) -> dict:
    return {str(p.relative_to(folder)): hashlib.sha256(p.read_bytes()).hexdigest()
            for p in sorted(folder.rglob("*")) if p.is_file()}


def _no_leftovers(parent: Path, name: str) -> None:
    assert not [p.name for p in parent.iterdir() if p.name.startswith(f".{name}.")]


@pytest.fixture(scope="module")
def spfq(tmp_path_factory) -> Path:
    base = tmp_path_factory.mktemp("src")
    r = _cli("compress", ROOT / "tests" / "zoo_model.py", "--bits", "4", "-q", "-o", base / "zoo.spfq")
    assert r.returncode == 0, r.stderr
    return base / "zoo.spfq"


@pytest.fixture(scope="module")
def earlier_export(spfq, tmp_path_factory) -> Path:
    out = tmp_path_factory.mktemp("earlier") / "out"
    r = _cli("export", spfq, "-o", out, *FAST)
    assert r.returncode == 0, r.stderr
    return out


# ---------------------------------------------------------------- defect 2: --force and user files

def test_force_refuses_a_folder_that_is_not_an_export(spfq, tmp_path):
    out = tmp_path / "mine"
    out.mkdir()
    (out / "thesis.tex").write_text("years of work")
    (out / "data").mkdir()
    (out / "data" / "x.csv").write_text("1,2")
    r = _cli("export", spfq, "-o", out, "--force", *FAST)
    assert r.returncode == 2
    assert "not an spfq-deploy export" in _one_line_error(r.stderr)
    assert (out / "thesis.tex").read_text() == "years of work" and (out / "data" / "x.csv").is_file()
    _no_leftovers(tmp_path, "mine")


def test_force_refuses_an_export_holding_a_user_file(spfq, earlier_export, tmp_path):
    out = tmp_path / "out"
    subprocess.run(["cp", "-a", str(earlier_export), str(out)], check=True)
    (out / "notes.md").write_text("my notes")
    before = _tree(out)
    r = _cli("export", spfq, "-o", out, "--force", *FAST)
    assert r.returncode == 2
    assert "notes.md" in _one_line_error(r.stderr)
    assert _tree(out) == before


def test_force_replaces_an_earlier_export_or_an_empty_folder(spfq, earlier_export, tmp_path):
    out = tmp_path / "out"
    subprocess.run(["cp", "-a", str(earlier_export), str(out)], check=True)
    r = _cli("export", spfq, "-o", out, "--force", "--format", "onnx", "--flavours", "qonnx")
    assert r.returncode == 0, r.stderr
    assert (out / "model.qonnx.onnx").is_file() and not (out / "model.stock.onnx").exists()
    empty = tmp_path / "empty"
    empty.mkdir()
    r = _cli("export", spfq, "-o", empty, "--force", *FAST)
    assert r.returncode == 0, r.stderr
    assert (empty / "manifest.json").is_file()
    _no_leftovers(tmp_path, "out")


def test_force_refuses_a_folder_whose_manifest_is_not_ours(spfq, tmp_path):
    out = tmp_path / "out"
    out.mkdir()
    (out / "manifest.json").write_text(json.dumps({"format": "someone-else", "files": {"a.txt": {}}}))
    (out / "a.txt").write_text("theirs")
    r = _cli("export", spfq, "-o", out, "--force", *FAST)
    assert r.returncode == 2 and "not an spfq-deploy export" in _one_line_error(r.stderr)
    assert (out / "a.txt").read_text() == "theirs"


def test_output_dot_and_parents_of_the_working_directory_are_errors(spfq, tmp_path):
    work = tmp_path / "work"
    work.mkdir()
    (work / "keep.txt").write_text("keep")
    for target in (".", "..", str(work)):
        r = _cli("export", spfq, "-o", target, "--force", *FAST, cwd=work)
        assert r.returncode == 2, (target, r.stderr)
        assert "current directory" in _one_line_error(r.stderr)
    assert (work / "keep.txt").read_text() == "keep" and sorted(p.name for p in work.iterdir()) == ["keep.txt"]


def test_output_inside_a_file_is_an_error(spfq, tmp_path):
    (tmp_path / "afile").write_text("x")
    for out in (tmp_path / "afile" / "sub", tmp_path / "afile", tmp_path / "afile" / "a" / "b"):
        r = _cli("export", spfq, "-o", out, *FAST)
        assert r.returncode == 2, r.stderr
        assert "not a directory" in _one_line_error(r.stderr)
    assert (tmp_path / "afile").read_text() == "x"


def test_export_into_a_read_only_parent_is_one_line(spfq, tmp_path, monkeypatch, capsys):
    def denied(*a, **k):  # root ignores permission bits, so the refusal is simulated where it happens
        raise PermissionError(13, "Permission denied", str(tmp_path))

    monkeypatch.setattr(atomic.tempfile, "mkdtemp", denied)
    rc = main(["export", str(spfq), "-o", str(tmp_path / "out"), *FAST])
    assert rc == 2
    assert "Permission denied" in _one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "out").exists()


# ---------------------------------------------------------------- defect 4: --format all is atomic

def test_format_all_is_atomic_when_the_tvm_stage_fails(spfq, earlier_export, tmp_path, monkeypatch, capsys):
    from spfq_deploy.errors import SpfqError

    def fail(*a, **k):
        raise SpfqError("TVM could not compile the model for x86_64: injected")

    monkeypatch.setattr(tvm_compile, "compile_library", fail)
    rc = main(["export", str(spfq), "-o", str(tmp_path / "new"), "--format", "all"])
    assert rc == 2 and "injected" in _one_line_error(capsys.readouterr().err)
    assert not (tmp_path / "new").exists()
    _no_leftovers(tmp_path, "new")
    good = tmp_path / "good"
    subprocess.run(["cp", "-a", str(earlier_export), str(good)], check=True)
    before = _tree(good)
    rc = main(["export", str(spfq), "-o", str(good), "--format", "all", "--force"])
    assert rc == 2
    capsys.readouterr()
    assert _tree(good) == before  # the good folder is not replaced by half of one
    _no_leftovers(tmp_path, "good")


def test_format_all_writes_both_manifests_listing_their_own_files(spfq, tmp_path):
    out = tmp_path / "out"
    r = _cli("export", spfq, "-o", out, "--format", "all", "--flavours", "stock")
    assert r.returncode == 0, r.stderr
    onnx_m = json.loads((out / "manifest.json").read_text())
    tvm_m = json.loads((out / "manifest.tvm.json").read_text())
    assert "model.stock.onnx" in onnx_m["files"] and "model.x86_64.so" not in onnx_m["files"]
    assert "model.x86_64.so" in tvm_m["files"] and "run_tvm.py" in tvm_m["files"]
    assert {"model.spfq", "inputs.npz"} <= set(onnx_m["files"]) & set(tvm_m["files"])
    listed = set(onnx_m["files"]) | set(tvm_m["files"]) | {"manifest.json", "manifest.tvm.json"}
    assert set(_tree(out)) == listed


# ---------------------------------------------------------------- defect 5: concurrent exports

def test_concurrent_exports_to_one_new_folder_exactly_one_wins(spfq, tmp_path):
    out = tmp_path / "out"
    cmd = [sys.executable, "-m", "spfq_deploy.cli", "export", str(spfq), "-o", str(out), *FAST]
    procs = [subprocess.Popen(cmd, cwd=ROOT, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True)
             for _ in range(2)]
    results = [(p.wait(timeout=300), p.stderr.read()) for p in procs]
    codes = sorted(rc for rc, _ in results)
    assert codes == [0, 2], results
    loser = next(err for rc, err in results if rc == 2)
    assert "exists" in _one_line_error(loser)
    assert (out / "manifest.json").is_file()
    _no_leftovers(tmp_path, "out")


def test_a_folder_that_appears_while_exporting_is_not_replaced(spfq, tmp_path, monkeypatch, capsys):
    out = tmp_path / "out"
    real_write = onnx_backend.Backend.write

    def write_then_lose_the_race(self, stage):
        result = real_write(self, stage)
        out.mkdir()  # another export committed first
        (out / "winner.txt").write_text("first")
        return result

    monkeypatch.setattr(onnx_backend.Backend, "write", write_then_lose_the_race)
    rc = main(["export", str(spfq), "-o", str(out), *FAST])
    assert rc == 2 and "exists" in _one_line_error(capsys.readouterr().err)
    assert sorted(p.name for p in out.iterdir()) == ["winner.txt"]
    _no_leftovers(tmp_path, "out")


def test_renameat2_noreplace_refuses_an_empty_folder_too(tmp_path):
    src, dst = tmp_path / "a", tmp_path / "b"
    src.mkdir()
    dst.mkdir()  # a plain rename(2) would silently replace an empty directory
    with pytest.raises(FileExistsError):
        atomic.rename_noreplace(src, dst)
    assert src.is_dir() and dst.is_dir()


# ---------------------------------------------------------------- defect 7: tracebacks -> one line

def test_tvm_error_with_an_empty_message_is_one_line(spfq, tmp_path, monkeypatch, capsys):
    import tvm

    def empty(*a, **k):
        raise RuntimeError("")

    monkeypatch.setattr(tvm, "compile", empty)
    rc = main(["export", str(spfq), "-o", str(tmp_path / "out"), "--format", "tvm"])
    line = _one_line_error(capsys.readouterr().err)
    assert rc == 2 and "TVM could not compile the model for x86_64: RuntimeError" in line
    assert not (tmp_path / "out").exists()


def test_interrupt_wrapped_by_tvm_stays_an_interrupt(spfq, tmp_path, monkeypatch, capsys):
    import tvm

    def wrapped(*a, **k):
        try:
            raise KeyboardInterrupt
        except KeyboardInterrupt as exc:
            raise RuntimeError("") from exc

    monkeypatch.setattr(tvm, "compile", wrapped)
    rc = main(["export", str(spfq), "-o", str(tmp_path / "out"), "--format", "tvm"])
    err = capsys.readouterr().err
    assert rc == 130 and err.strip() == "spfq-deploy: error: interrupted (nothing was written)"
    assert not (tmp_path / "out").exists()
    _no_leftovers(tmp_path, "out")


def test_ctrl_c_while_tvm_compiles_leaves_nothing(spfq, tmp_path):
    out = tmp_path / "out"
    p = subprocess.Popen([sys.executable, "-u", "-m", "spfq_deploy.cli", "export", str(spfq), "-o", str(out),
                          "--format", "tvm", "--target", "arm64"], cwd=ROOT, stdout=subprocess.PIPE,
                         stderr=subprocess.PIPE, text=True)
    deadline = time.time() + 240
    for line in p.stdout:  # interrupt once TVM is compiling
        if line.startswith("compiling for") or time.time() > deadline:
            break
    time.sleep(0.5)
    p.send_signal(signal.SIGINT)
    rc = p.wait(timeout=240)
    err = p.stderr.read()
    assert rc == 130, (rc, err)
    assert err.strip().splitlines()[-1] == "spfq-deploy: error: interrupted (nothing was written)"
    assert "Traceback" not in err
    assert not out.exists()
    _no_leftovers(tmp_path, "out")


def test_a_clean_export_prints_nothing_on_stderr(spfq, tmp_path):
    r = _cli("export", spfq, "-o", tmp_path / "out", "--format", "all")
    assert r.returncode == 0, r.stderr
    assert r.stderr == ""  # no torch warning about the capture domain, no deprecation noise


# ---------------------------------------------------------------- defect 10: targets are names

def test_target_is_a_name_in_targets_not_a_path(spfq, tmp_path):
    evil = tmp_path / "evil.toml"
    marker = tmp_path / "ran"
    evil.write_text(Path(ROOT / "targets" / "x86_64.toml").read_text().replace('cc = "cc"', f'cc = "touch {marker};cc"')
                    .replace('name = "x86_64"', 'name = "evil"'))
    rel = os.path.relpath(tmp_path / "evil", ROOT / "targets")
    for name in (rel, str(tmp_path / "evil"), "../targets/x86_64", "x86_64.toml", ""):
        r = _cli("export", spfq, "-o", tmp_path / "out", "--target", name, *FAST)
        assert r.returncode == 2, (name, r.stderr)
        assert "unknown target" in _one_line_error(r.stderr)
    assert not marker.exists() and not (tmp_path / "out").exists()


def test_target_file_loads_an_explicit_target(spfq, tmp_path):
    mine = tmp_path / "mybox.toml"
    mine.write_text(Path(ROOT / "targets" / "x86_64.toml").read_text().replace('name = "x86_64"', 'name = "mybox"'))
    r = _cli("export", spfq, "-o", tmp_path / "out", "--target-file", mine, "--format", "onnx", "--flavours", "custom")
    assert r.returncode == 0, r.stderr
    m = json.loads((tmp_path / "out" / "manifest.json").read_text())
    assert m["target"] == "mybox" and set(m["custom_op_library"]["files"]) == {"mybox", "x86_64"}
    for bad, why in (("nope.toml", "no such target file"), ("bad.toml", "not valid TOML")):
        if bad == "bad.toml":
            (tmp_path / bad).write_text("name = [")
        r = _cli("export", spfq, "-o", tmp_path / "o2", "--target-file", tmp_path / bad, *FAST)
        assert r.returncode == 2 and why in _one_line_error(r.stderr)
    r = _cli("export", spfq, "-o", tmp_path / "o2", "--target-file", mine, "--target", "arm64", *FAST)
    assert r.returncode == 2 and "not both" in _one_line_error(r.stderr)


# ---------------------------------------------------------------- layout: one job loads everything once

def test_one_export_loads_the_source_and_each_target_once(spfq, tmp_path, monkeypatch, capsys):
    from spfq_deploy import targets
    from spfq_deploy.export import job
    from spfq_deploy.pack import container

    loads, target_files = [], []
    real_load, real_target = container.load, targets.load_target_file
    monkeypatch.setattr(container, "load", lambda p: loads.append(p) or real_load(p))
    monkeypatch.setattr(targets, "load_target_file", lambda p: target_files.append(Path(p).name) or real_target(p))
    monkeypatch.setattr(job, "load_target_file", targets.load_target_file)
    rc = main(["export", str(spfq), "-o", str(tmp_path / "out"), "--format", "all", "--target", "cuda"])
    assert rc == 0, capsys.readouterr().err
    assert len(loads) == 1  # was three: once per backend
    assert sorted(target_files) == ["cuda.toml", "x86_64.toml"]  # was six
    names = {p.name for p in (tmp_path / "out").iterdir()}
    assert {"manifest.json", "manifest.tvm.json", "manifest.cuda.json"} <= names
