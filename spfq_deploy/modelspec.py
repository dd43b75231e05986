"""Load user code: `path/to/file.py[:factory]` model factories and calibration data files.

Convention: a model file's default factory is `build()`, and it may provide its calibration
data as `calibration()`, so `spfq-deploy compress examples/mnist_cnn.py --bits 1` needs no
other flag. Files inside a package folder (with __init__.py) are imported as package modules,
so their relative and absolute imports work.
"""

from __future__ import annotations

import importlib
import importlib.util
import sys
from pathlib import Path
from types import ModuleType

import numpy as np
from torch import nn

from .errors import CalibrationError, SpfqError

DEFAULT_FACTORY = "build"
DEFAULT_CALIBRATION = "calibration"


def split_spec(spec: str, default: str) -> tuple[Path, str]:
    """'file.py:fn' -> (file.py, fn); 'file.py' -> (file.py, default)."""
    if ":" in spec and not spec.endswith(".py"):
        path, _, attr = spec.rpartition(":")
        return Path(path), attr or default
    return Path(spec), default


def import_file(path: Path) -> ModuleType:
    """Import a .py file by path (as pkg.module when its folder is a package)."""
    if path.is_dir():
        raise SpfqError(f"{path}: is a directory, not a .py file")
    if not path.is_file():
        raise SpfqError(f"{path}: no such file")
    if path.suffix != ".py":
        raise SpfqError(f"{path}: a model file must be a .py file")
    path = path.resolve()
    parts = [path.stem]
    root = path.parent
    while (root / "__init__.py").is_file():
        parts.insert(0, root.name)
        root = root.parent
    name = ".".join(parts)
    if str(root) not in sys.path:
        sys.path.insert(0, str(root))
    try:
        if len(parts) > 1:
            return importlib.import_module(name)
        spec = importlib.util.spec_from_file_location(name, path)
        module = importlib.util.module_from_spec(spec)
        sys.modules[name] = module
        spec.loader.exec_module(module)
        return module
    except SpfqError:
        raise
    except SystemExit as exc:
        raise SpfqError(f"{path}: import failed: the file called sys.exit({exc.code})") from None
    except Exception as exc:
        raise SpfqError(f"{path}: import failed: {type(exc).__name__}: {_first_line(exc)}") from None


def _first_line(exc: BaseException) -> str:
    text = str(exc).strip()
    return text.splitlines()[0] if text else type(exc).__name__


def load_model(spec: str) -> tuple[nn.Module, ModuleType]:
    """Call the factory named by `spec`; the result must be an nn.Module."""
    path, attr = split_spec(spec, DEFAULT_FACTORY)
    module = import_file(path)
    factory = getattr(module, attr, None)
    if not callable(factory):
        raise SpfqError(f"{path}: has no factory function '{attr}'")
    try:
        model = factory()
    except SpfqError:
        raise
    except SystemExit as exc:
        raise SpfqError(f"model factory {path}:{attr} called sys.exit({exc.code})") from None
    except Exception as exc:
        raise SpfqError(f"model factory {path}:{attr} failed: {type(exc).__name__}: {_first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise SpfqError(f"model factory {path}:{attr} returned {type(model).__name__}, not a torch nn.Module")
    return model.eval(), module


def calibration_label(arg: str | None, model_spec: str) -> str:
    """How error messages name the calibration data: the file, or file.py:function."""
    if arg is None:
        return f"{split_spec(model_spec, DEFAULT_FACTORY)[0]}:{DEFAULT_CALIBRATION}"
    path, attr = split_spec(arg, DEFAULT_CALIBRATION)
    return f"{path}:{attr}" if path.suffix == ".py" else str(path)


_MAGIC = {".npy": (b"\x93NUMPY",), ".npz": (b"PK\x03\x04", b"PK\x05\x06")}  # zip: entries / empty


def load_calibration(arg: str | None, model_module: ModuleType | None, batch_size: int = 64):
    """Calibration data from .npy/.npz, `file.py:function`, or the model file's calibration().

    Several .npz arrays are the model's positional inputs, batched together by batch_size."""
    if arg is None:
        fn = getattr(model_module, DEFAULT_CALIBRATION, None) if model_module else None
        if not callable(fn):
            raise CalibrationError("no calibration data: pass --calib FILE or define calibration() in the model file")
        return _call_data(fn, f"{model_module.__name__}.{DEFAULT_CALIBRATION}")
    path, attr = split_spec(arg, DEFAULT_CALIBRATION)
    if path.suffix == ".py":
        fn = getattr(import_file(path), attr, None)
        if not callable(fn):
            raise CalibrationError(f"{path}: has no function '{attr}'")
        return _call_data(fn, f"{path}:{attr}")
    if path.suffix not in _MAGIC:
        raise CalibrationError(f"{path}: calibration data must be .npy, .npz or file.py:function")
    if path.is_dir():
        raise CalibrationError(f"{path}: is a directory, not a calibration file")
    if not path.is_file():
        raise CalibrationError(f"{path}: no such calibration file")
    try:
        with open(path, "rb") as f:
            head = f.read(6)
        if not head.startswith(_MAGIC[path.suffix]):
            raise CalibrationError(f"{path}: not a {path.suffix} file (numpy.save / numpy.savez write those)")
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        with np.load(path, allow_pickle=False) as z:
            arrays = [(k, z[k]) for k in z.files]
        if not arrays:
            raise CalibrationError(f"{path}: holds no arrays")
        if len(arrays) == 1:
            return arrays[0][1]
        for k, a in arrays:
            if a.ndim == 0:
                raise CalibrationError(f"{path}: array '{k}' is a scalar, not a batch of samples")
        n = arrays[0][1].shape[0]
        if any(a.shape[0] != n for _, a in arrays):
            raise CalibrationError(f"{path}: arrays differ in their first (sample) dimension: "
                                   + ", ".join(f"{k} {a.shape[0]}" for k, a in arrays))
        return _zip_batches([a for _, a in arrays], batch_size)
    except CalibrationError:
        raise
    except ValueError as exc:
        if "allow_pickle" in str(exc) or "pickle" in str(exc):
            raise CalibrationError(f"{path}: holds Python objects (dtype object, which needs pickle and is not "
                                   f"loaded); calibration data must be a numeric array") from None
        raise CalibrationError(f"{path}: cannot read calibration data: {_first_line(exc)}") from None
    except Exception as exc:
        raise CalibrationError(f"{path}: cannot read calibration data: {_first_line(exc)}") from None


def _zip_batches(arrays, size):
    """Several .npz arrays are positional inputs: batch them together."""
    return [tuple(a[i:i + size] for a in arrays) for i in range(0, arrays[0].shape[0], size)]


def _call_data(fn, label):
    try:
        return fn()
    except SpfqError:
        raise
    except SystemExit as exc:
        raise CalibrationError(f"calibration function {label} called sys.exit({exc.code})") from None
    except Exception as exc:
        raise CalibrationError(f"calibration function {label} failed: {type(exc).__name__}: {_first_line(exc)}") from None
