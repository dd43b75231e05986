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
    except Exception as exc:
        raise SpfqError(f"model factory {path}:{attr} failed: {type(exc).__name__}: {_first_line(exc)}") from None
    if not isinstance(model, nn.Module):
        raise SpfqError(f"model factory {path}:{attr} returned {type(model).__name__}, not a torch nn.Module")
    return model.eval(), module


def load_calibration(arg: str | None, model_module: ModuleType | None):
    """Calibration data from .npy/.npz, `file.py:function`, or the model file's calibration()."""
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
    if not path.is_file():
        raise CalibrationError(f"{path}: no such calibration file")
    try:
        if path.suffix == ".npy":
            return np.load(path, allow_pickle=False)
        if path.suffix == ".npz":
            with np.load(path, allow_pickle=False) as z:
                arrays = [z[k] for k in z.files]
            if not arrays:
                raise CalibrationError(f"{path}: empty .npz")
            if len(arrays) == 1:
                return arrays[0]
            n = arrays[0].shape[0]
            if any(a.shape[0] != n for a in arrays):
                raise CalibrationError(f"{path}: arrays differ in their first (sample) dimension")
            return _zip_batches(arrays, 64)
    except CalibrationError:
        raise
    except Exception as exc:
        raise CalibrationError(f"{path}: cannot read calibration data: {_first_line(exc)}") from None
    raise CalibrationError(f"{path}: calibration data must be .npy, .npz or file.py:function")


def _zip_batches(arrays, size):
    """Several .npz arrays are positional inputs: batch them together."""
    return [tuple(a[i:i + size] for a in arrays) for i in range(0, arrays[0].shape[0], size)]


def _call_data(fn, label):
    try:
        return fn()
    except SpfqError:
        raise
    except Exception as exc:
        raise CalibrationError(f"calibration function {label} failed: {type(exc).__name__}: {_first_line(exc)}") from None
