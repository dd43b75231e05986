"""Where an export may be written, and which existing folder --force may replace.

The rule that protects the user's files: --force replaces only a folder that is an earlier
spfq-deploy export (a manifest of ours lists every file in it) or an empty folder. Anything
else is refused with one line, as are outputs that would swallow the working directory.
"""

from __future__ import annotations

import json
import os
from pathlib import Path

from ..errors import SpfqError

MANIFESTS = ("manifest.json", "manifest.tvm.json", "manifest.cuda.json")
FORMAT_PREFIX = "spfq-deploy/"


def check_output(out: Path, force: bool) -> None:
    """Refuse outputs that can never be right, before any slow work."""
    resolved = out.resolve()
    cwd = Path.cwd().resolve()
    if resolved == cwd or resolved in cwd.parents:
        raise SpfqError(f"-o {out}: the output would replace the current directory or one of its parents; "
                        "name a new folder, e.g. -o out/")
    for p in [out, *out.parents]:
        if os.path.lexists(p):
            if not p.is_dir():
                what = "exists and is not a directory" if p == out else "is a file, not a directory"
                raise SpfqError(f"{p} {what}: cannot write the export {'there' if p == out else f'{out} inside it'}")
            break
    if out.is_dir():
        if not force:
            raise SpfqError(f"{out} exists (use --force to replace an earlier export)")
        why = not_replaceable(out)
        if why:
            raise SpfqError(why)


def export_files(out: Path) -> set[str] | None:
    """The files an export folder's manifests account for (the manifests too), or None when
    the folder holds no manifest of ours."""
    listed, found = set(), False
    for name in MANIFESTS:
        path = out / name
        if not path.is_file():
            continue
        try:
            doc = json.loads(path.read_text())
        except (OSError, ValueError):
            return None
        if not isinstance(doc, dict) or not str(doc.get("format", "")).startswith(FORMAT_PREFIX):
            return None
        found = True
        listed.add(name)
        files = doc.get("files")
        if isinstance(files, dict):
            listed.update(str(k) for k in files)
    return listed if found else None


def not_replaceable(out: Path) -> str | None:
    """None when --force may replace `out`, else the one-line reason it may not."""
    present = sorted(str(p.relative_to(out)) for p in out.rglob("*") if p.is_file() or p.is_symlink())
    if not present:
        return None
    listed = export_files(out)
    if listed is None:
        return (f"{out} is not an spfq-deploy export folder (no manifest of ours): --force replaces only an "
                "earlier export or an empty folder; choose another -o")
    foreign = [p for p in present if p not in listed]
    if foreign:
        more = f" and {len(foreign) - 1} more" if len(foreign) > 1 else ""
        return (f"{out} holds files that are not part of its export ({foreign[0]}{more}): --force will not "
                "delete them; move them out or choose another -o")
    return None
