"""--resume (compress/checkpoint.py): an interrupted compression continues from its last finished
layer group and writes the same bytes as an uninterrupted run (issue 14)."""

from __future__ import annotations

import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest

from spfq_deploy.cli import main
from spfq_deploy.compress import compress_model, engine
from spfq_deploy.compress.checkpoint import side_file
from spfq_deploy.pack import container

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))

from test_compress_sequential import _calib, residual_stack  # noqa: E402


def _save(path, res) -> bytes:
    container.save(path, res.model)
    return path.read_bytes()


@pytest.mark.parametrize("which,group", [("sequential", 0), ("replay", 0), ("sequential", 32)])
def test_interrupted_run_resumes_to_the_same_bytes(tmp_path, monkeypatch, which, group):
    model, calib = residual_stack(4), _calib()
    opts = dict(bits=3, method="spfq", seed=4, engine=which, progress=False, group_size=group)
    clean = _save(tmp_path / "clean.spfq", compress_model(model, calib, **opts))
    side = tmp_path / "side"
    real, calls = engine._compress_one, []

    def dying(name, *a, **k):
        calls.append(name)
        if len(calls) == 5:
            raise KeyboardInterrupt
        return real(name, *a, **k)
    monkeypatch.setattr(engine, "_compress_one", dying)
    with pytest.raises(KeyboardInterrupt):
        compress_model(model, calib, checkpoint=side, **opts)
    assert side.exists()
    calls.clear()
    monkeypatch.setattr(engine, "_compress_one", lambda name, *a, **k: (calls.append(name), real(name, *a, **k))[1])
    resumed = compress_model(model, calib, checkpoint=side, resume=True, **opts)
    assert len(calls) == len(resumed.report) - 4  # the 4 finished layers came from the side file
    assert _save(tmp_path / "resumed.spfq", resumed) == clean


def test_cli_killed_mid_run_resumes_to_the_same_bytes(tmp_path):
    out, clean = tmp_path / "m.spfq", tmp_path / "clean.spfq"
    args = ["examples/mnist_cnn.py", "--bits", "4", "-q"]
    assert main(["compress", *args, "-o", str(clean)]) == 0
    side = side_file(out)
    env = dict(os.environ, PYTHONPATH=str(ROOT))
    proc = subprocess.Popen([sys.executable, "-m", "spfq_deploy.cli", "compress", *args, "-o", str(out)], cwd=ROOT,
                            env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    t0 = time.monotonic()
    while not side.exists() and proc.poll() is None and time.monotonic() - t0 < 120:
        time.sleep(0.02)
    proc.send_signal(signal.SIGKILL)
    proc.wait()
    assert side.exists() and not out.exists(), "the run ended before it could be killed after a layer"
    assert main(["compress", *args, "-o", str(out), "--resume"]) == 0
    assert out.read_bytes() == clean.read_bytes()
    assert not side.exists()  # removed once the run is complete


def test_resume_file_of_another_run_is_refused(tmp_path, capsys):
    out = tmp_path / "m.spfq"
    side = side_file(out)
    model, calib = residual_stack(2), _calib()
    compress_model(model, calib, bits=4, checkpoint=side, progress=False)  # a run with other settings
    assert main(["compress", "examples/mnist_cnn.py", "--bits", "4", "-q", "-o", str(out), "--resume"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "belongs to another run" in err[0]
    assert side.exists() and not out.exists()  # the other run's state is not ours to delete here
