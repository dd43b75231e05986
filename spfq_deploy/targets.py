"""Deployment targets as data: targets/*.toml (compiler, flags, kernel ISA, TVM dict, how to run).

Nothing else in the package branches on a target name; it asks a Target for its tools. A
missing tool is reported with the Debian package that provides it.
"""

from __future__ import annotations

import os
import shutil
import tomllib
from dataclasses import dataclass, field
from pathlib import Path

from .errors import SpfqError

ROOT = Path(__file__).resolve().parents[1]


def targets_dir() -> Path:
    return Path(os.environ.get("SPFQ_TARGETS_DIR", ROOT / "targets"))


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
    """The target named `name` (a file targets/<name>.toml)."""
    path = targets_dir() / f"{name}.toml"
    if not path.is_file():
        raise SpfqError(f"unknown target {name!r} (known: {', '.join(known_targets()) or 'none'})")
    try:
        data = tomllib.loads(path.read_text())
    except tomllib.TOMLDecodeError as exc:
        raise SpfqError(f"{path}: not valid TOML ({exc})") from None
    try:
        return Target(name=data["name"], description=data.get("description", ""), arch=data["arch"],
                      triple=data["triple"], run=data["run"], cc=data["cc"], cxx=data["cxx"],
                      cflags=tuple(data.get("cflags", ())), kernel_isa=data.get("kernel_isa", "auto"),
                      runtime_packages=tuple(data.get("runtime_packages", ())),
                      tools=dict(data.get("tools", {})), tvm=dict(data.get("tvm", {})),
                      cuda=dict(data.get("cuda", {})))
    except KeyError as exc:
        raise SpfqError(f"{path}: missing key {exc.args[0]!r}") from None
