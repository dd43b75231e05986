"""Deployment targets as data: targets/*.toml (compiler, flags, kernel ISA, TVM dict, how to run).

Nothing else in the package branches on a target name; it asks a Target for its tools. A
missing tool is reported with the Debian package that provides it.
"""

from __future__ import annotations

import os
import platform
import re
import shutil
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import SpfqError

ROOT = Path(__file__).resolve().parents[1]
# this machine as a target name (platform.machine() -> targets/<name>.toml)
HOST = {"x86_64": "x86_64", "amd64": "x86_64", "aarch64": "arm64", "arm64": "arm64"}.get(
    platform.machine().lower(), platform.machine())
_NAME = re.compile(r"[A-Za-z0-9][A-Za-z0-9_-]*")


def targets_dir() -> Path:
    return Path(os.environ.get("SPFQ_TARGETS_DIR", ROOT / "targets"))


RUN_MODES = ("native", "qemu-aarch64", "cuda")


@dataclass(frozen=True)
class Target:
    name: str
    description: str
    arch: str
    triple: str
    run: str  # "native" | "qemu-aarch64" | "cuda" (host code native, kernels on an NVIDIA GPU)
    cc: str
    cxx: str
    cflags: tuple[str, ...]
    kernel_isa: str
    runtime_packages: tuple[str, ...] = ()
    tools: dict = field(default_factory=dict)
    tvm: dict = field(default_factory=dict)
    cuda: dict = field(default_factory=dict)  # [cuda]: nvcc, nvcc_flags, gencode (GPU targets only)

    @property
    def native(self) -> bool:
        return self.run == "native"

    def require(self, *programs: str) -> None:
        """Raise SpfqError naming the Debian package of the first program not on PATH."""
        for prog in programs:
            if shutil.which(prog) is None:
                pkg = self.tools.get(prog)
                hint = f" (Debian: apt-get install {pkg})" if pkg else ""
                raise SpfqError(f"target {self.name}: '{prog}' not found{hint}")


def known_targets() -> list[str]:
    return sorted(p.stem for p in targets_dir().glob("*.toml"))


def get_target(name: str) -> Target:
    """The target named `name`: a file targets/<name>.toml, nothing else. A target names the
    compilers an export runs, so a name is never a path (--target-file takes a path)."""
    if not isinstance(name, str) or not _NAME.fullmatch(name) or name not in known_targets():
        raise SpfqError(f"unknown target {name!r} (known: {', '.join(known_targets()) or 'none'}; "
                        "a target file elsewhere: --target-file PATH)")
    return load_target_file(targets_dir() / f"{name}.toml")


def load_target_file(path: str | os.PathLike) -> Target:
    """A target from an explicit TOML file (--target-file), same schema as targets/*.toml."""
    path = Path(path)
    try:
        data = tomllib.loads(path.read_text())
    except FileNotFoundError:
        raise SpfqError(f"{path}: no such target file") from None
    except (OSError, UnicodeDecodeError) as exc:
        raise SpfqError(f"{path}: cannot read the target file ({exc})") from None
    except tomllib.TOMLDecodeError as exc:
        raise SpfqError(f"{path}: not valid TOML ({exc})") from None
    try:
        tgt = Target(name=data["name"], description=data.get("description", ""), arch=data["arch"],
                     triple=data["triple"], run=data["run"], cc=data["cc"], cxx=data["cxx"],
                     cflags=tuple(data.get("cflags", ())), kernel_isa=data.get("kernel_isa", "auto"),
                     runtime_packages=tuple(data.get("runtime_packages", ())),
                     tools=dict(data.get("tools", {})), tvm=dict(data.get("tvm", {})),
                     cuda=dict(data.get("cuda", {})))
    except KeyError as exc:
        raise SpfqError(f"{path}: missing key {exc.args[0]!r}") from None
    except (TypeError, ValueError) as exc:
        raise SpfqError(f"{path}: malformed target table ({exc})") from None
    bad = [k for k in ("name", "arch", "triple", "run", "cc", "cxx") if not isinstance(getattr(tgt, k), str)]
    if bad or not _NAME.fullmatch(tgt.name) or not all(isinstance(f, str) for f in tgt.cflags):
        raise SpfqError(f"{path}: malformed target table ({bad[0] if bad else 'name or cflags'} "
                        "must be a string / a plain name / a list of strings)")
    if tgt.run not in RUN_MODES:
        raise SpfqError(f"{path}: run = {tgt.run!r}, expected one of {', '.join(RUN_MODES)}")
    return tgt


def host_target() -> Target:
    return get_target(HOST)
