"""llama.cpp anchor for issue 17 (LLM decoders): SmolLM2-135M-Instruct in llama.cpp, same model, same text.

    python benchmarks/llama_cpp.py --out benchmarks/results/llama_cpp.json [--threads 1,2] [--chunks 24]
                                   [--quants Q4_0,Q4_K_M,Q2_K,TQ2_0] [--reps 5] [--no-bench] [--force]

(``make bench-llama-cpp``; not part of ``make test``.) Steps, each also a function a later
benchmarks/llm.py can call in the same run:

1. ``build_tools()``: llama.cpp from the source vendored in the llama-cpp-python 0.3.36 sdist
   (``pip download --no-deps --no-binary :all:``), cmake Release, CPU only, GGML_NATIVE on,
   static, only llama-quantize / llama-perplexity / llama-bench / llama-tokenize. Work tree
   build/llama.cpp.work/ (kept, so an interrupted build resumes); the finished tools are
   build/llama.cpp/bin/ with build-info.json, moved into place by one rename after every step
   succeeded (a failed build never looks finished). Reused while the host's ISA flags match.
2. ``reference_gguf()``: the fp32 reference as a GGUF: every tensor of the Q4_1 file
   dequantised with gguf.quants.dequantize to F32, written with GGUFWriter in the same order
   and the same (llama.cpp, interleaved-RoPE) layout, every metadata key/value copied
   (general.file_type = ALL_F32). build/llm/, temp file + rename.
3. ``quantize(kind)``: llama-quantize of the F32 file (Q4_0, Q4_K_M, Q2_K, TQ2_0);
   ``gguf_stats(path)``: size, bits/weight over the 210 projections and overall, type counts.
4. ``perplexity(path, threads, chunks)``: llama-perplexity -c 512 --chunks N on the held-out
   text. The SmolLM2 GGUF says tokenizer.ggml.add_bos_token = false, so stock llama-perplexity
   puts no BOS in front of the text nor at the start of each chunk; examples.smollm2.perplexity
   does both. By default we pass ``--override-kv tokenizer.ggml.add_bos_token=bool:true`` so
   the windows are exactly examples.smollm2.held_out_chunks(); ``bos=False`` runs it stock.
5. ``bench(path, threads, prompt, gen)``: llama-bench -p 128 -n 128 (pp and tg tokens/s, std).
6. ``tokenizer_check()``: llama-tokenize on the held-out text against examples.smollm2.encode_text.

The F32 file is checked against the PyTorch reference (examples.smollm2.build()) on the same
chunks: the two perplexities agree within 0.5% (``reference_check()``). Errors are one line
and exit status 2.
"""

from __future__ import annotations

import argparse
import contextlib
import datetime
import json
import math
import os
import platform
import re
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from collections import Counter
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
if str(ROOT) not in sys.path:
    sys.path.insert(0, str(ROOT))

from spfq_deploy.atomic import write_bytes, write_text  # noqa: E402
from spfq_deploy.export.source import file_sha256  # noqa: E402

BUILD = ROOT / "build"
LLAMA = BUILD / "llama.cpp"              # the finished tools: bin/ + build-info.json
WORK = BUILD / "llama.cpp.work"          # source + cmake tree (kept for incremental rebuilds)
DOWNLOADS = BUILD / "downloads"
LLM = BUILD / "llm"                      # GGUF files, the held-out text, logs

SDIST_NAME, SDIST_VERSION = "llama-cpp-python", "0.3.36"
SDIST_FILE = f"llama_cpp_python-{SDIST_VERSION}.tar.gz"
TOOLS = ("llama-quantize", "llama-perplexity", "llama-bench", "llama-tokenize")
QUANTS = ("Q4_0", "Q4_K_M", "Q2_K", "TQ2_0")
MODEL_STEM = "SmolLM2-135M-Instruct"
CONTEXT, CHUNKS = 512, 24
ISA_FLAGS = ("avx2", "avx512f", "avx512bw", "avx512vl", "avx512_vnni", "avx512_bf16", "avx_vnni",
             "amx_tile", "amx_int8", "amx_bf16", "fma", "f16c")
PROJECTION = re.compile(r"blk\.\d+\.(attn_(q|k|v|output)|ffn_(gate|up|down))\.weight")
BOS_OVERRIDE = "tokenizer.ggml.add_bos_token=bool:true"
CMAKE_FLAGS = ("-DCMAKE_BUILD_TYPE=Release", "-DGGML_NATIVE=ON", "-DLLAMA_CURL=OFF", "-DLLAMA_OPENSSL=OFF",
               "-DBUILD_SHARED_LIBS=OFF", "-DGGML_CUDA=OFF", "-DGGML_VULKAN=OFF", "-DGGML_METAL=OFF",
               "-DGGML_BLAS=OFF", "-DGGML_BACKEND_DL=OFF", "-DLLAMA_BUILD_TESTS=OFF",
               "-DLLAMA_BUILD_EXAMPLES=OFF", "-DLLAMA_BUILD_SERVER=OFF", "-DLLAMA_BUILD_TOOLS=ON")

COMMANDS: list[str] = []                 # every external command this run started, in order


class AnchorError(Exception):
    """Something the anchor cannot do, said in one line (exit status 2)."""


# --------------------------------------------------------------------------------------------
# helpers
# --------------------------------------------------------------------------------------------

def _quote(cmd) -> str:
    return " ".join(str(c) if re.fullmatch(r"[\w@%+=:,./-]+", str(c)) else repr(str(c)) for c in cmd)


def _rel(p) -> str:
    p = Path(p)
    with contextlib.suppress(ValueError):
        return str(p.relative_to(ROOT))
    return str(p)


def _run(cmd, log: Path | None = None, what: str = "", env=None, cwd=None) -> subprocess.CompletedProcess:
    """Run cmd, capture stdout/stderr (also to ``log``); a failure is one AnchorError line."""
    cmd = [str(c) for c in cmd]
    COMMANDS.append(_quote([_rel(c) if c.startswith(str(ROOT)) else c for c in cmd]))
    try:
        proc = subprocess.run(cmd, capture_output=True, text=True, errors="replace", env=env, cwd=cwd)
    except OSError as e:
        raise AnchorError(f"{what or Path(cmd[0]).name}: cannot run {cmd[0]}: {e.strerror}") from None
    if log is not None:
        log.parent.mkdir(parents=True, exist_ok=True)
        log.write_text(f"$ {_quote(cmd)}\n--- stdout\n{proc.stdout}\n--- stderr\n{proc.stderr}")
    if proc.returncode != 0:
        lines = [ln.strip() for ln in (proc.stderr + "\n" + proc.stdout).splitlines() if ln.strip()]
        # the first real error (a compiler's "error:", CMake's "CMake Error" + its message), else the last line
        first = next((i for i, ln in enumerate(lines) if re.search(r"CMake Error|\berror:|fatal error", ln)), None)
        if first is None:
            tail = lines[-1] if lines else "no output"
        elif lines[first].startswith("CMake Error") and first + 1 < len(lines):
            tail = f"{lines[first]} {lines[first + 1]}"
        else:
            tail = lines[first]
        where = f" (log: {_rel(log)})" if log is not None else ""
        raise AnchorError(f"{what or Path(cmd[0]).name} failed (exit {proc.returncode}): {tail[:300]}{where}")
    return proc


def _tmp_path(path: Path) -> Path:
    return path.with_name(f".{path.name}.{os.getpid()}.tmp")


def cpu_info() -> dict:
    """Model name, core count and the ISA flags that matter for llama.cpp's CPU kernels."""
    flags: set[str] = set()
    model = platform.processor() or platform.machine()
    with contextlib.suppress(OSError):
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            key, _, value = line.partition(":")
            if key.strip() == "flags" and not flags:
                flags = set(value.split())
            elif key.strip() == "model name":
                model = value.strip()
    return {"model": model, "cpus": os.cpu_count(), "machine": platform.machine(),
            "isa": {f: f in flags for f in ISA_FLAGS}}


def load_avg() -> list[float]:
    return [round(x, 2) for x in os.getloadavg()]


# --------------------------------------------------------------------------------------------
# 1. llama.cpp from the llama-cpp-python sdist
# --------------------------------------------------------------------------------------------

def _sdist() -> Path:
    """The llama-cpp-python sdist, downloaded once with pip into build/downloads/."""
    dest = DOWNLOADS / SDIST_FILE
    if dest.is_file():
        return dest
    DOWNLOADS.mkdir(parents=True, exist_ok=True)
    with tempfile.TemporaryDirectory(dir=DOWNLOADS, prefix=".pip.") as tmp:
        _run([sys.executable, "-m", "pip", "download", "-q", "--no-deps", "--no-binary", ":all:",
              f"{SDIST_NAME}=={SDIST_VERSION}", "-d", tmp], what="pip download " + SDIST_NAME)
        got = Path(tmp) / SDIST_FILE
        if not got.is_file():
            raise AnchorError(f"pip download {SDIST_NAME}=={SDIST_VERSION} gave {sorted(os.listdir(tmp))}, "
                              f"not {SDIST_FILE}")
        os.replace(got, dest)
    return dest


def _vendored_commit(changelog: str) -> str:
    """The llama.cpp commit the sdist vendors, from its CHANGELOG's entry for this version."""
    m = re.search(rf"^## \[{re.escape(SDIST_VERSION)}\]\n(.*?)(?=^## \[)", changelog, re.S | re.M)
    hit = re.search(r"llama\.cpp@([0-9a-f]{7,40})", m.group(1)) if m else None
    return hit.group(1) if hit else "unknown"


def _source(sdist: Path) -> tuple[Path, str]:
    """vendor/llama.cpp of the sdist, extracted once to build/llama.cpp.work/src; the commit."""
    src, commit_file = WORK / "src", WORK / "vendored-commit.txt"
    if src.is_dir() and commit_file.is_file() and (src / "CMakeLists.txt").is_file():
        return src, commit_file.read_text().strip()
    WORK.mkdir(parents=True, exist_ok=True)
    top = f"llama_cpp_python-{SDIST_VERSION}/"
    vendor = top + "vendor/llama.cpp/"
    tmp = WORK / f".src.{os.getpid()}.tmp"
    shutil.rmtree(tmp, ignore_errors=True)
    try:
        with tarfile.open(sdist) as tar:
            members, changelog = [], ""
            for m in tar.getmembers():
                if m.name == top + "CHANGELOG.md":
                    changelog = tar.extractfile(m).read().decode("utf-8", "replace")
                elif m.name.startswith(vendor) and len(m.name) > len(vendor):
                    m.name = m.name[len(vendor):]
                    members.append(m)
            if not members:
                raise AnchorError(f"{_rel(sdist)} has no {vendor}")
            tar.extractall(tmp, members=members, filter="data")
    except (tarfile.TarError, OSError) as e:
        shutil.rmtree(tmp, ignore_errors=True)
        raise AnchorError(f"cannot unpack {_rel(sdist)}: {e}") from None
    commit = _vendored_commit(changelog)
    shutil.rmtree(src, ignore_errors=True)
    os.replace(tmp, src)
    commit_file.write_text(commit + "\n")
    return src, commit


def _native_key() -> dict:
    return {f: v for f, v in cpu_info()["isa"].items()}


def build_commands(commit: str, jobs: int | None = None) -> list[str]:
    """The commands build_tools() runs (paths relative to the repository)."""
    tree, src = _rel(WORK / "cmake"), _rel(WORK / "src")
    return [f"python -m pip download -q --no-deps --no-binary :all: {SDIST_NAME}=={SDIST_VERSION} -d {_rel(DOWNLOADS)}",
            f"tar: {SDIST_FILE} llama_cpp_python-{SDIST_VERSION}/vendor/llama.cpp/ -> {src}",
            _quote(["cmake", "-S", src, "-B", tree, *CMAKE_FLAGS, f"-DLLAMA_BUILD_COMMIT={commit}"]),
            _quote(["cmake", "--build", tree, "--config", "Release", "-j", str(jobs or os.cpu_count() or 1),
                    "--target", *TOOLS]),
            f"copy {tree}/bin/{{{','.join(TOOLS)}}} -> {_rel(LLAMA / 'bin')} (staged, one rename)"]


def cpu_backend_variant() -> str | None:
    """What cmake's configure step said about the CPU backend (e.g. 'ggml-cpu: -march=native')."""
    with contextlib.suppress(OSError):
        m = re.search(r"Adding CPU backend variant (.*)", (WORK / "logs" / "configure.log").read_text(errors="replace"))
        return m.group(1).strip() if m else None
    return None


def build_info() -> dict:
    """build/llama.cpp/build-info.json of the finished build ({} when there is none)."""
    with contextlib.suppress(OSError, ValueError):
        return json.loads((LLAMA / "build-info.json").read_text())
    return {}


def build_tools(jobs: int | None = None, quiet: bool = False) -> Path:
    """build/llama.cpp/bin with the four tools; builds them when missing or built for other ISA flags."""
    info = build_info()
    bindir = LLAMA / "bin"
    if info and all((bindir / t).is_file() for t in TOOLS):
        same_isa = info.get("native_isa") == _native_key()
        if same_isa and info.get("cmake_flags", [])[:len(CMAKE_FLAGS)] == list(CMAKE_FLAGS):
            return bindir
        if not quiet:
            why = "other ISA flags (GGML_NATIVE)" if not same_isa else "other cmake flags"
            print(f"llama_cpp: the finished build was made for {why}; rebuilding", file=sys.stderr)
    cmake = shutil.which("cmake")
    if cmake is None:
        raise AnchorError("cmake not found: install it (apt-get install cmake; `make bench-llama-cpp` does it as root)")
    for cc in ("cc", "c++"):
        if shutil.which(cc) is None:
            raise AnchorError(f"no C/C++ compiler ({cc}) found: apt-get install build-essential")
    t0 = time.perf_counter()
    sdist = _sdist()
    src, commit = _source(sdist)
    tree = WORK / "cmake"
    logs = WORK / "logs"
    env = dict(os.environ, GIT_CEILING_DIRECTORIES=str(WORK))  # the sdist has no .git: never read ours
    flags = [*CMAKE_FLAGS, f"-DLLAMA_BUILD_COMMIT={commit}"]
    if not quiet:
        print(f"llama_cpp: building llama.cpp {commit} (llama-cpp-python {SDIST_VERSION} sdist) in {_rel(tree)}",
              file=sys.stderr)
    _run([cmake, "-S", src, "-B", tree, *flags], log=logs / "configure.log", what="cmake configure", env=env)
    jobs = jobs or os.cpu_count() or 1
    _run([cmake, "--build", tree, "--config", "Release", "-j", str(jobs), "--target", *TOOLS],
         log=logs / "build.log", what="cmake build", env=env)
    stage = BUILD / f".llama.cpp.{os.getpid()}.tmp"
    shutil.rmtree(stage, ignore_errors=True)
    (stage / "bin").mkdir(parents=True)
    for t in TOOLS:
        hits = [p for p in (tree / "bin" / t, tree / t) if p.is_file()]
        if not hits:
            shutil.rmtree(stage, ignore_errors=True)
            raise AnchorError(f"cmake build finished but {t} is not in {_rel(tree / 'bin')}")
        shutil.copy2(hits[0], stage / "bin" / t)
    version = _run([stage / "bin" / "llama-bench", "--version"], what="llama-bench --version")
    cache = (tree / "CMakeCache.txt").read_text(errors="replace")
    compiler = re.search(r"^CMAKE_CXX_COMPILER:\w+=(.*)$", cache, re.M)
    info = {"sdist": f"{SDIST_NAME}=={SDIST_VERSION}", "sdist_sha256": file_sha256(sdist),
            "vendored_commit": commit, "commit_source": f"{SDIST_FILE}: CHANGELOG.md [{SDIST_VERSION}]",
            "version_output": (version.stdout + version.stderr).strip(),
            "cmake": _run([cmake, "--version"]).stdout.splitlines()[0],
            "cmake_flags": flags, "commands": build_commands(commit, jobs),
            "cpu_backend_variant": cpu_backend_variant(),
            "compiler": compiler.group(1) if compiler else "unknown",
            "native_isa": _native_key(), "tools": list(TOOLS), "build_s": round(time.perf_counter() - t0, 1),
            "built": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")}
    (stage / "build-info.json").write_text(json.dumps(info, indent=1) + "\n")
    if LLAMA.exists():
        shutil.rmtree(LLAMA)
    os.replace(stage, LLAMA)
    return bindir


def tool(name: str) -> Path:
    return build_tools() / name


# --------------------------------------------------------------------------------------------
# 2. the fp32 reference as a GGUF
# --------------------------------------------------------------------------------------------

def _gguf():
    try:
        import gguf
    except ImportError:
        raise AnchorError("the gguf package is missing: run `make setup` (it installs gguf==0.19.0)") from None
    return gguf


def source_gguf() -> Path:
    from examples import smollm2
    return smollm2.gguf_path()


def _field_value(field, gguf):
    """A reader field's value in the form GGUFWriter.add_key_value takes, with its types."""
    vt = gguf.GGUFValueType
    main = field.types[0]
    if main == vt.ARRAY:
        sub = field.types[-1]
        if len(field.types) != 2:
            raise AnchorError(f"metadata {field.name}: nested arrays are not supported")
        if sub == vt.STRING:
            return [bytes(field.parts[i]).decode("utf-8") for i in field.data], main, sub
        return [field.parts[i].tolist()[0] for i in field.data], main, sub
    if main == vt.STRING:
        return bytes(field.parts[field.data[0]]).decode("utf-8"), main, None
    return field.parts[field.data[0]].tolist()[0], main, None


def reference_gguf(force: bool = False) -> Path:
    """build/llm/SmolLM2-135M-Instruct.F32.gguf: the Q4_1 file with every tensor dequantised to F32."""
    gguf = _gguf()
    out = LLM / f"{MODEL_STEM}.F32.gguf"
    if out.is_file() and not force:
        return out
    import numpy as np
    src = source_gguf()
    reader = gguf.GGUFReader(str(src))
    arch = reader.fields["general.architecture"].contents()
    LLM.mkdir(parents=True, exist_ok=True)
    tmp = _tmp_path(out)
    writer = gguf.GGUFWriter(str(tmp), arch)
    try:
        seen_file_type = False
        for name, field in reader.fields.items():
            if name.startswith("GGUF.") or name == "general.architecture":
                continue  # header fields; GGUFWriter writes the architecture itself
            value, vtype, sub = _field_value(field, gguf)
            if name == "general.file_type":
                value, seen_file_type = int(gguf.LlamaFileType.ALL_F32), True
            elif name == "general.alignment":
                writer.data_alignment = int(value)
            writer.add_key_value(name, value, vtype, sub_type=sub)
        if not seen_file_type:
            writer.add_file_type(int(gguf.LlamaFileType.ALL_F32))
        for t in reader.tensors:
            w = np.ascontiguousarray(gguf.quants.dequantize(t.data, t.tensor_type), dtype=np.float32)
            ne = [int(x) for x in t.shape]  # ggml order (innermost first)
            if list(w.shape[::-1]) != ne:
                raise AnchorError(f"{t.name}: dequantised shape {w.shape} does not match ggml ne {ne}")
            writer.add_tensor(t.name, w)
        writer.write_header_to_file()
        writer.write_kv_data_to_file()
        writer.write_tensors_to_file()
        writer.close()
        _check_reference(src, tmp, gguf)
        os.replace(tmp, out)
    except BaseException:
        with contextlib.suppress(Exception):
            writer.close()
        with contextlib.suppress(OSError):
            os.unlink(tmp)
        raise
    return out


def _check_reference(src: Path, path: Path, gguf) -> None:
    """The written file has the source's keys/values (file_type aside) and tensors (same order,
    shape), every tensor F32 and equal to the dequantised source tensor."""
    import numpy as np
    a, b = gguf.GGUFReader(str(src)), gguf.GGUFReader(str(path))
    skip = {"GGUF.kv_count", "GGUF.tensor_count", "GGUF.version", "general.file_type"}
    ka = [k for k in a.fields if k not in skip]
    kb = [k for k in b.fields if k not in skip]
    if ka != kb:
        raise AnchorError(f"F32 GGUF keys differ from the source: {sorted(set(ka) ^ set(kb))}")
    for k in ka:
        if a.fields[k].contents() != b.fields[k].contents() or a.fields[k].types != b.fields[k].types:
            raise AnchorError(f"F32 GGUF metadata {k} differs from the source")
    if b.fields["general.file_type"].contents() != int(gguf.LlamaFileType.ALL_F32):
        raise AnchorError("F32 GGUF: general.file_type is not ALL_F32")
    if [t.name for t in a.tensors] != [t.name for t in b.tensors]:
        raise AnchorError("F32 GGUF tensors are not the source's, in its order")
    for ta, tb in zip(a.tensors, b.tensors):
        if tb.tensor_type != gguf.GGMLQuantizationType.F32 or list(ta.shape) != list(tb.shape):
            raise AnchorError(f"F32 GGUF {tb.name}: {tb.tensor_type.name} {list(tb.shape)}, "
                              f"expected F32 {list(ta.shape)}")
        if not np.array_equal(gguf.quants.dequantize(ta.data, ta.tensor_type), np.asarray(tb.data)):
            raise AnchorError(f"F32 GGUF {tb.name}: values differ from the dequantised source")


# --------------------------------------------------------------------------------------------
# 3. quantisation, and what a GGUF file holds
# --------------------------------------------------------------------------------------------

def quantize(kind: str, threads: int | None = None, force: bool = False) -> Path:
    """build/llm/SmolLM2-135M-Instruct.<kind>.gguf: llama-quantize of the F32 reference (no imatrix)."""
    if kind not in QUANTS and not re.fullmatch(r"[A-Z0-9_]+", kind):
        raise AnchorError(f"unknown quantisation type {kind!r}")
    out = LLM / f"{MODEL_STEM}.{kind}.gguf"
    if out.is_file() and not force:
        return out
    src = reference_gguf()
    tmp = _tmp_path(out)
    try:
        _run([tool("llama-quantize"), src, tmp, kind, str(threads or os.cpu_count() or 1)],
             log=LLM / "logs" / f"quantize_{kind}.log", what=f"llama-quantize {kind}")
        os.replace(tmp, out)
    finally:
        with contextlib.suppress(OSError):
            os.unlink(tmp)
    return out


_FALLBACK = re.compile(r"(\S+)\s+- ncols\s+(\d+) not divisible by (\d+) \(required for type\s+(\w+)\)"
                       r"\s*-> falling back to\s+(\w+)")


def quantize_fallbacks(kind: str) -> dict:
    """llama-quantize's fallbacks for ``kind`` (from its log): "wanted -> used" with the tensor
    count and the tensor roles (attn_q, ffn_up, ...) it happened to."""
    log = LLM / "logs" / f"quantize_{kind}.log"
    if not log.is_file():
        return {}
    out: dict[str, dict] = {}
    for name, ncols, block, wanted, used in _FALLBACK.findall(log.read_text(errors="replace")):
        role = name.split(".")[2] if name.startswith("blk.") else name
        e = out.setdefault(f"{wanted} -> {used}", {"tensors": 0, "roles": Counter(), "reason": set()})
        e["tensors"] += 1
        e["roles"][role] += 1
        e["reason"].add(f"ncols {ncols} not divisible by {block}")
    return {k: {"tensors": v["tensors"], "roles": dict(sorted(v["roles"].items())), "reason": sorted(v["reason"])}
            for k, v in out.items()}


def gguf_stats(path: Path) -> dict:
    """Size, bits per weight (the 210 projections; every tensor) and tensor types of a GGUF file."""
    gguf = _gguf()
    r = gguf.GGUFReader(str(path))
    proj_bits = proj_n = all_bits = all_n = 0
    types, proj_types = Counter(), Counter()
    by_role: dict[str, Counter] = {}
    for t in r.tensors:
        bits, n = 8 * int(t.n_bytes), int(t.n_elements)
        all_bits, all_n = all_bits + bits, all_n + n
        types[t.tensor_type.name] += 1
        role = t.name.split(".")[2] if t.name.startswith("blk.") else t.name.rsplit(".", 1)[0]
        by_role.setdefault(role, Counter())[t.tensor_type.name] += 1
        if PROJECTION.fullmatch(t.name):
            proj_bits, proj_n = proj_bits + bits, proj_n + n
            proj_types[t.tensor_type.name] += 1
    n_proj = sum(proj_types.values())
    ft = r.fields.get("general.file_type")
    return {"path": _rel(path), "file_bytes": path.stat().st_size, "file_mib": round(path.stat().st_size / 2**20, 2),
            "file_type": int(ft.contents()) if ft is not None else None,
            "tensors": len(r.tensors), "projections": n_proj,
            "bpw_projections": proj_bits / proj_n if proj_n else None, "bpw_all": all_bits / all_n,
            "params_projections": proj_n, "params_all": all_n,
            "type_counts": dict(types.most_common()), "projection_type_counts": dict(proj_types.most_common()),
            "types_by_role": {k: dict(v.most_common()) for k, v in by_role.items()}}


# --------------------------------------------------------------------------------------------
# 4. perplexity
# --------------------------------------------------------------------------------------------

def held_out_file() -> Path:
    """build/llm/held_out.txt: examples.smollm2.held_out_text(), UTF-8, written atomically."""
    from examples import smollm2
    text = smollm2.held_out_text()
    out = LLM / "held_out.txt"
    data = text.encode("utf-8")
    if not (out.is_file() and out.read_bytes() == data):
        out.parent.mkdir(parents=True, exist_ok=True)
        write_bytes(out, data)
    return out


def perplexity_run(path: Path, threads: int = 2, chunks: int = CHUNKS, context: int = CONTEXT,
                   bos: bool = True, extra: tuple[str, ...] = ()) -> dict:
    """llama-perplexity on the held-out text: the final estimate, its +/-, the per-chunk figures,
    what llama.cpp's system_info line says it runs with, the command and its time."""
    cmd = [tool("llama-perplexity"), "-m", path, "-f", held_out_file(), "-c", str(context),
           "--chunks", str(chunks), "-t", str(threads), "-tb", str(threads), *extra]
    if bos:
        cmd += ["--override-kv", BOS_OVERRIDE]
    label = Path(path).name.removeprefix(MODEL_STEM + ".").removesuffix(".gguf")
    t0, load0 = time.perf_counter(), load_avg()
    proc = _run(cmd, log=LLM / "logs" / f"perplexity_{label}_t{threads}{'' if bos else '_nobos'}.log",
                what=f"llama-perplexity {label}")
    out = proc.stdout + "\n" + proc.stderr
    m = re.search(r"Final estimate: PPL = ([0-9.]+) \+/- ([0-9.]+)", out)
    if not m:
        raise AnchorError(f"llama-perplexity {label}: no 'Final estimate' in its output")
    per_chunk = [float(x) for x in re.findall(r"\[\d+\]([0-9.]+)", out)]
    sysinfo = re.search(r"system_info: (.*)", out)
    nchunks = re.search(r"calculating perplexity over (\d+) chunks, n_ctx=(\d+), batch_size=(\d+), n_seq=(\d+)", out)
    return {"ppl": float(m.group(1)), "ppl_pm": float(m.group(2)), "per_chunk_running": per_chunk,
            "chunks": int(nchunks.group(1)) if nchunks else None,
            "n_ctx": int(nchunks.group(2)) if nchunks else None,
            "bos": bos, "threads": threads, "system_info": sysinfo.group(1).strip() if sysinfo else None,
            "seconds": round(time.perf_counter() - t0, 2), "load_avg_before": load0, "load_avg_after": load_avg(),
            "command": COMMANDS[-1]}


def perplexity(path: Path, threads: int = 2, chunks: int = CHUNKS, bos: bool = True) -> float:
    """llama-perplexity's final estimate on the held-out text (-c 512, BOS as examples.smollm2 puts it)."""
    return perplexity_run(path, threads, chunks, bos=bos)["ppl"]


def reference_check(threads: int = 2, chunks: int = CHUNKS, tolerance: float = 0.005) -> dict:
    """llama-perplexity on the F32 GGUF against examples.smollm2.perplexity(build()) on the same
    chunks (BOS as the PyTorch rule puts it), and stock (no BOS) against the same rule without BOS."""
    from examples import smollm2
    f32 = reference_gguf()
    model = smollm2.build()
    t0 = time.perf_counter()
    torch_bos = smollm2.perplexity(model, chunks)
    torch_nobos = smollm2.perplexity(model, chunks, bos=False)
    torch_s = time.perf_counter() - t0
    with_bos = perplexity_run(f32, threads, chunks, bos=True)
    stock = perplexity_run(f32, threads, chunks, bos=False)
    rel_bos = abs(with_bos["ppl"] - torch_bos) / torch_bos
    rel_nobos = abs(stock["ppl"] - torch_nobos) / torch_nobos
    return {"pytorch_ppl": torch_bos, "llama_cpp_ppl": with_bos["ppl"], "rel_diff": rel_bos,
            "pytorch_ppl_nobos": torch_nobos, "llama_cpp_ppl_stock_nobos": stock["ppl"], "rel_diff_nobos": rel_nobos,
            "tolerance": tolerance, "ok": rel_bos <= tolerance and rel_nobos <= tolerance,
            "pytorch_seconds": round(torch_s, 1), "llama_cpp_bos": with_bos, "llama_cpp_stock": stock,
            "note": ("the GGUF says tokenizer.ggml.add_bos_token = false: stock llama-perplexity adds no BOS; "
                     f"with --override-kv {BOS_OVERRIDE} it uses examples.smollm2.held_out_chunks() exactly")}


# --------------------------------------------------------------------------------------------
# 5. decode speed
# --------------------------------------------------------------------------------------------

def bench(path: Path, threads: int = 1, prompt: int = 128, gen: int = 128, reps: int = 5) -> dict:
    """llama-bench -p PROMPT -n GEN -t THREADS: prompt processing and generation tokens/s (mean, std)."""
    cmd = [tool("llama-bench"), "-m", path, "-p", str(prompt), "-n", str(gen), "-t", str(threads),
           "-r", str(reps), "-o", "json"]
    label = Path(path).name.removeprefix(MODEL_STEM + ".").removesuffix(".gguf")
    load0 = load_avg()
    proc = _run(cmd, log=LLM / "logs" / f"bench_{label}_t{threads}.log", what=f"llama-bench {label}")
    load1 = load_avg()
    start = proc.stdout.find("[")
    try:
        rows = json.loads(proc.stdout[start:]) if start >= 0 else []
    except ValueError:
        rows = []
    if not rows:
        raise AnchorError(f"llama-bench {label}: no JSON results in its output")
    res: dict = {"threads": threads, "prompt": prompt, "gen": gen, "reps": reps, "load_avg_before": load0,
                 "load_avg_after": load1, "command": COMMANDS[-1]}
    for row in rows:
        key = "tg" if row.get("n_gen", 0) > 0 else "pp"
        res[key] = {"tokens_per_s": row["avg_ts"], "std": row["stddev_ts"], "n_prompt": row.get("n_prompt"),
                    "n_gen": row.get("n_gen"), "samples_ts": row.get("samples_ts")}
    first = rows[0]
    res["llama_cpp"] = {k: first.get(k) for k in ("build_commit", "build_number", "cpu_info", "backends", "model_type",
                                                  "model_size", "model_n_params", "n_batch", "n_ubatch", "type_k",
                                                  "type_v", "flash_attn", "repack", "n_threads")}
    return res


# --------------------------------------------------------------------------------------------
# 6. tokenizer
# --------------------------------------------------------------------------------------------

def llama_tokenize(path: Path, text_file: Path) -> list[int]:
    """llama-tokenize's ids for the file's bytes (verbatim, no escape processing, special tokens
    not parsed: as llama-perplexity tokenizes; BOS only if the GGUF asks for it)."""
    proc = _run([tool("llama-tokenize"), "-m", path, "-f", text_file, "--ids", "--no-escape",
                 "--no-parse-special", "--log-disable"], what="llama-tokenize")
    lines = [ln for ln in proc.stdout.splitlines() if ln.startswith("[")]
    if not lines:
        raise AnchorError("llama-tokenize: no id list in its output")
    return json.loads(lines[-1])


def _diff_regions(a: list[int], b: list[int], limit: int = 20) -> tuple[int, list[tuple[int, int, int, int]]]:
    """Number of differing regions between a and b and the first ``limit`` (i1, i2, j1, j2)."""
    import difflib
    ops = [op for op in difflib.SequenceMatcher(None, a, b, autojunk=False).get_opcodes() if op[0] != "equal"]
    return len(ops), [tuple(op[1:]) for op in ops[:limit]]


def tokenizer_check(path: Path | None = None) -> dict:
    """llama-tokenize(held_out_text()) against [BOS] + examples.smollm2.encode_text(held_out_text())."""
    from examples import smollm2
    path = path or reference_gguf()
    text_file = held_out_file()
    ours = [smollm2.BOS, *smollm2.encode_text(smollm2.held_out_text())]
    theirs_raw = llama_tokenize(path, text_file)
    bos_added = bool(theirs_raw) and theirs_raw[0] == smollm2.BOS
    theirs = theirs_raw if bos_added else [smollm2.BOS, *theirs_raw]
    res = {"n_ours": len(ours), "n_llama_cpp": len(theirs), "llama_cpp_added_bos": bos_added,
           "identical": ours == theirs, "compared": "[BOS] + encode_text(text) vs llama-tokenize ids"
           + ("" if bos_added else " with BOS put in front (llama.cpp adds none: add_bos_token = false)"),
           "command": COMMANDS[-1]}
    if ours != theirs:
        first = next((i for i, (x, y) in enumerate(zip(ours, theirs)) if x != y), min(len(ours), len(theirs)))
        tok = smollm2.tokenizer()
        n, regions = _diff_regions(ours, theirs)
        res["first_difference"] = first
        res["differing_regions"] = n
        res["regions"] = [{"ours_at": i1, "llama_cpp_at": j1,
                           "ours": [tok.id_to_token(t) for t in ours[i1:i2]],
                           "llama_cpp": [tok.id_to_token(t) for t in theirs[j1:j2]],
                           "text": tok.decode(ours[max(i1 - 3, 1):i2 + 3])} for i1, i2, j1, j2 in regions]
    return res


# --------------------------------------------------------------------------------------------
# the whole anchor
# --------------------------------------------------------------------------------------------

def _fmt(x, nd=2) -> str:
    return "-" if x is None or (isinstance(x, float) and math.isnan(x)) else f"{x:.{nd}f}"


def markdown(result: dict) -> str:
    threads = result["config"]["threads"]
    head = ["model", "MiB", "bpw proj", "bpw all", "projection types", "PPL"]
    for t in threads:
        head += [f"pp{result['config']['prompt']} t/s ({t}t)", f"tg{result['config']['gen']} t/s ({t}t)"]
    lines = ["| " + " | ".join(head) + " |", "|" + "---|" * len(head)]
    for name, m in result["models"].items():
        s = m["stats"]
        types = ", ".join(f"{k} {v}" for k, v in s["projection_type_counts"].items())
        row = [name, _fmt(s["file_mib"], 1), _fmt(s["bpw_projections"]), _fmt(s["bpw_all"]), types,
               _fmt(m.get("perplexity", {}).get("ppl"), 3)]
        for t in threads:
            b = m.get("bench", {}).get(str(t), {})
            for k in ("pp", "tg"):
                v = b.get(k)
                row.append(f"{v['tokens_per_s']:.1f} ± {v['std']:.1f}" if v else "-")
        lines.append("| " + " | ".join(row) + " |")
    return "\n".join(lines)


def run(out: Path, threads=(1, 2), chunks: int = CHUNKS, quants=QUANTS, reps: int = 5, prompt: int = 128,
        gen: int = 128, do_bench: bool = True, force: bool = False) -> dict:
    t0, load0 = time.perf_counter(), load_avg()
    ppl_threads = max(threads)
    bindir = build_tools()
    binfo = build_info()
    f32 = reference_gguf(force=force)
    check = reference_check(ppl_threads, chunks)
    tok = tokenizer_check(f32)
    models: dict[str, dict] = {"F32": {"path": _rel(f32)}}
    for q in quants:
        models[q] = {"path": _rel(quantize(q, force=force))}
    for name, m in models.items():
        m["stats"] = gguf_stats(ROOT / m["path"])
        if name != "F32":
            m["quantize_fallbacks"] = quantize_fallbacks(name)
        m["perplexity"] = check["llama_cpp_bos"] if name == "F32" else perplexity_run(ROOT / m["path"], ppl_threads, chunks)
    if do_bench:
        for name, m in models.items():
            m["bench"] = {str(t): bench(ROOT / m["path"], t, prompt, gen, reps) for t in threads}
    f32_ppl = models["F32"]["perplexity"]["ppl"]
    for m in models.values():
        m["ppl_vs_f32"] = m["perplexity"]["ppl"] / f32_ppl
    goals = [{"id": "llama_cpp_f32_matches_pytorch", "perf_md": "LLM decode (SmolLM2-135M): anchor sanity",
              "goal": "llama-perplexity on the F32 GGUF within 0.5% of examples.smollm2.perplexity(build()), same chunks",
              "target": check["tolerance"], "unit": "relative difference (lower is better)",
              "measured_ratio": check["rel_diff"], "status": "met" if check["rel_diff"] <= check["tolerance"] else "missed"},
             {"id": "llama_cpp_tokenizer_matches", "perf_md": "LLM decode (SmolLM2-135M): anchor sanity",
              "goal": "llama-tokenize ids == [BOS] + examples.smollm2.encode_text on the held-out text",
              "target": 1.0, "unit": "identical (1/0)", "measured_ratio": 1.0 if tok["identical"] else 0.0,
              "status": "met" if tok["identical"] else "missed",
              **({} if tok["identical"] else {"limited_by": f"first difference at token {tok['first_difference']}"})}]
    sysinfo = models["F32"]["perplexity"].get("system_info")
    result = {
        "schema": "llama_cpp/1",
        "created": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
        "notes": ["llama.cpp anchor for issue 17 (benchmarks/llm.py compares against it); timings on a shared, "
                  "loaded 2-core VM are for checking the pipeline, not for quoting (see load averages)",
                  "perplexity: -c 512, --chunks N, BOS forced with --override-kv so the windows are "
                  "examples.smollm2.held_out_chunks(); the file itself says add_bos_token = false",
                  "llama-bench: pp and tg measured separately (-p 128 -n 128), mean +/- std over reps; "
                  "default KV cache f16, flash attention auto, weight repacking on",
                  "llama-quantize from the F32 file, no imatrix, no --allow-requantize (not needed: the source is F32); "
                  "SmolLM2's 576 columns are not a multiple of 256, so every K-quant / TQ2_0 tensor except "
                  "ffn_down (1536 columns) falls back (models.*.quantize_fallbacks, types_by_role)",
                  "the fp32 reference is itself the dequantised Q4_1 file (asymmetric 4-bit, blocks of 32)"],
        "machine": {**cpu_info(), "platform": platform.platform(), "load_avg_before": load0},
        "config": {"threads": list(threads), "perplexity_threads": ppl_threads, "chunks": chunks,
                   "context": CONTEXT, "prompt": prompt, "gen": gen, "reps": reps, "quants": list(quants)},
        "llama_cpp": {**binfo, "bin": _rel(bindir), "system_info": sysinfo,
                      "build_commands": binfo.get("commands") or build_commands(binfo.get("vendored_commit", "?")),
                      "cpu_backend_variant": binfo.get("cpu_backend_variant") or cpu_backend_variant()},
        "source_gguf": {"path": str(source_gguf()), "bytes": source_gguf().stat().st_size},
        "reference_check": check,
        "tokenizer": tok,
        "models": models,
        "goals": goals,
        "commands": list(COMMANDS),
    }
    result["machine"]["load_avg_after"] = load_avg()
    result["wall_s"] = round(time.perf_counter() - t0, 1)
    result["markdown"] = markdown(result)
    out.parent.mkdir(parents=True, exist_ok=True)
    write_text(out, json.dumps(result, indent=1) + "\n")
    return result


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--out", type=Path, default=ROOT / "benchmarks" / "results" / "llama_cpp.json")
    ap.add_argument("--threads", default="1,2", help="llama-bench thread counts; perplexity uses the largest")
    ap.add_argument("--chunks", type=int, default=CHUNKS)
    ap.add_argument("--quants", default=",".join(QUANTS))
    ap.add_argument("--reps", type=int, default=5, help="llama-bench repetitions")
    ap.add_argument("--prompt", type=int, default=128)
    ap.add_argument("--gen", type=int, default=128)
    ap.add_argument("--no-bench", action="store_true", help="skip llama-bench (sizes and perplexity only)")
    ap.add_argument("--force", action="store_true", help="rewrite the GGUF files (the build is reused)")
    ap.add_argument("--build-only", action="store_true", help="only build the llama.cpp tools")
    args = ap.parse_args(argv)
    try:
        threads = tuple(int(t) for t in args.threads.split(","))
        quants = tuple(q.strip() for q in args.quants.split(",") if q.strip())
        if args.build_only:
            print(build_tools())
            print(json.dumps(build_info(), indent=1))
            return 0
        result = run(args.out, threads, args.chunks, quants, args.reps, args.prompt, args.gen,
                     not args.no_bench, args.force)
    except AnchorError as e:
        print(f"llama_cpp: {e}", file=sys.stderr)
        return 2
    except ValueError as e:
        print(f"llama_cpp: bad option: {e}", file=sys.stderr)
        return 2
    except Exception as e:  # examples' SpfqError (missing package / file) is one line too
        if type(e).__name__ in ("SpfqError", "CalibrationError") or getattr(e, "exit_code", None) == 2:
            print(f"llama_cpp: {e}", file=sys.stderr)
            return 2
        raise
    c = result["reference_check"]
    print(result["markdown"])
    print(f"\nF32 GGUF vs PyTorch reference: llama-perplexity {c['llama_cpp_ppl']:.4f}, "
          f"examples.smollm2.perplexity {c['pytorch_ppl']:.4f} (rel {c['rel_diff']:.2e}); stock (no BOS) "
          f"{c['llama_cpp_ppl_stock_nobos']:.4f} vs {c['pytorch_ppl_nobos']:.4f} (rel {c['rel_diff_nobos']:.2e})")
    t = result["tokenizer"]
    print(f"tokenizer: {'identical' if t['identical'] else 'DIFFERENT (first at %d)' % t['first_difference']} "
          f"({t['n_ours']} tokens ours, {t['n_llama_cpp']} llama.cpp)")
    print(f"load average before {result['machine']['load_avg_before']}, after {result['machine']['load_avg_after']}")
    print(f"wrote {_rel(args.out)}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
