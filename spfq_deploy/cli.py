"""The `spfq-deploy` command. Bad input ends with one line on stderr and exit code 2."""

from __future__ import annotations

import argparse
import json
import sys
from dataclasses import replace
from pathlib import Path

from .errors import SpfqError, watch_interrupts


def _bits(text: str):
    if text in ("ternary", "t", "1.58"):
        return "ternary"
    if text.isdigit() and 1 <= int(text) <= 8:
        return int(text)
    raise argparse.ArgumentTypeError(f"bits must be 1, ternary or 2..8, got {text!r}")


def _fraction(text: str) -> float:
    try:
        v = float(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a number: {text!r}") from None
    if not 0.0 <= v < 1.0:
        raise argparse.ArgumentTypeError(f"must be in [0, 1), got {v}")
    return v


def _grid(text: str) -> tuple[float, ...]:
    try:
        vals = tuple(float(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"--c-grid takes comma-separated numbers, got {text!r}") from None
    if not vals or not all(0 < v < float("inf") for v in vals):  # also refuses nan
        raise argparse.ArgumentTypeError(f"--c-grid values must be positive finite numbers, got {text!r}")
    return vals


_UNITS = {"": 1, "K": 2 ** 10, "M": 2 ** 20, "G": 2 ** 30, "T": 2 ** 40}


def _bytes(text: str) -> int:
    """A size such as 4G, 512M, 1.5G or a plain number of bytes."""
    t = text.strip().upper().removesuffix("B").removesuffix("I")
    unit = t[-1:] if t[-1:] in _UNITS and t[-1:] else ""
    try:
        v = float(t[:-1] if unit else t)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not a size: {text!r} (e.g. 4G, 512M)") from None
    if not 0 <= v < float("inf"):
        raise argparse.ArgumentTypeError(f"must be a size >= 0, got {text!r}")
    return int(v * _UNITS[unit])


def _positive_int(text: str) -> int:
    try:
        v = int(text)
    except ValueError:
        raise argparse.ArgumentTypeError(f"not an integer: {text!r}") from None
    if v < 1:
        raise argparse.ArgumentTypeError(f"must be a positive integer, got {v}")
    return v


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="spfq-deploy", description=__doc__)
    sub = p.add_subparsers(dest="command", required=True)

    c = sub.add_parser("compress", help="compress a PyTorch model with SPFQ into a .spfq file")
    c.add_argument("model", help="model factory: path/to/file.py[:function] (default function: build)")
    c.add_argument("--calib", help="calibration data: .npy, .npz or file.py:function "
                                   "(default: the model file's calibration())")
    c.add_argument("--bits", type=_bits, default=None, help="1 (binary), ternary, or 2..8 (default 4)")
    c.add_argument("--bits-budget", metavar="B",
                   help="average bits/weight of the file (scales and padding included, as inspect counts them): "
                        "each layer's width is chosen from --bits-candidates by measured error curves so that "
                        "the average is <= B with the least output error (README: Bit budgets)")
    c.add_argument("--bits-candidates", metavar="W,W,...",
                   help="widths --bits-budget chooses from (default 1,ternary,2,3,4,8)")
    c.add_argument("--method", choices=["gpfq", "spfq", "gptq", "rtn"], default="gpfq",
                   help="gpfq: deterministic path following (default, best measured quality); "
                        "spfq: stochastic path following; gptq: GPTQ/OPTQ; rtn: round to nearest")
    c.add_argument("--act-order", action="store_true", help="gptq: columns by decreasing diag of X~'X~")
    c.add_argument("--damp", help="gptq: damping fraction F in (0, 1): H = X~'X~ + F mean(diag) I (default 0.01)")
    c.add_argument("--ridge", help="gpfq/spfq: add F mean(diag H) ||w - q||^2 to the objective (F in [0, 100], "
                                   "default 0): Q stays nearer W where the calibration says little")
    c.add_argument("--scale", default="search",
                   help="search (default): one C per layer minimising the calibration output error; "
                        "mse: a C per row minimising ||w - rtn(w)||^2 (GPTQ's choice)")
    c.add_argument("--sparsity", type=_fraction, default=0.0, help="target fraction of zero weights")
    c.add_argument("--order", type=int, default=1, help="order-r data alignment (default 1)")
    c.add_argument("--c-grid", type=_grid, help="comma-separated scale parameters C to search")
    c.add_argument("--per-layer-delta", action="store_true", help="one delta per layer instead of per channel")
    c.add_argument("--group-size", metavar="{32,64,128}",
                   help="one float16 scale per (output row, group of this many consecutive input columns) instead "
                        "of one per row (default: per row); the file is then format version 3")
    c.add_argument("--range-quantile", type=float, help="R_i = this quantile of |w_i| instead of max")
    c.add_argument("--bias-correction", action="store_true", help="b' = b + mean(XW^T - XtQ^T)")
    c.add_argument("--rescale", choices=["var", "ls"],
                   help="per output channel, rescale the compressed weights so the output's variance matches the "
                        "float layer's (var: BatchNorm statistics re-estimated) or by the least-squares gain (ls); "
                        "the mean is matched by a bias shift")
    c.add_argument("--no-fold-bn", action="store_true", help="do not fold BatchNorm into the layer before it")
    c.add_argument("--include", action="append", help="layer name pattern to compress (repeatable; default all)")
    c.add_argument("--exclude", action="append", default=[], help="layer name pattern to keep float (repeatable)")
    c.add_argument("--layer-bits", action="append", default=[], metavar="PATTERN=W",
                   help="width W (1, ternary, 2..8) for the layers matching PATTERN instead of --bits "
                        "(repeatable; the first matching pattern wins), e.g. lm_head=8")
    c.add_argument("--seed", type=int, default=0)
    c.add_argument("--batch-size", type=_positive_int, default=64,
                   help="batch size when calibration is one array (or the arrays of an .npz)")
    c.add_argument("--engine", choices=["auto", "sequential", "replay"], default="auto",
                   help="sequential: each model runs once, layer by layer (cost linear in depth); replay: "
                        "re-run both models up to every layer; auto (default): sequential when torch.export "
                        "can capture the model, else replay with a warning saying why")
    c.add_argument("--memory-budget", type=_bytes, default="4G",
                   help="live calibration activations kept in RAM before they spill to a mapped temporary "
                        "file (sequential engine; default 4G)")
    c.add_argument("--resume", action="store_true",
                   help="continue an interrupted run from its last finished layer (state in .OUT.resume next "
                        "to the output, written after every layer group, removed when the run succeeds)")
    c.add_argument("--threads", type=_positive_int, default=None,
                   help="torch / kernel threads per process (default: torch's, i.e. the cores; torchrun sets 1). "
                        "The bytes written depend on it (BLAS sums in another order): keep it to reproduce a file")
    c.add_argument("--layout", help="packed layout for every layer (sign, sign_mask, planes, offset, sparse, sign_rows, "
                   "sign_mask_rows, planes_rows; default per layer: the *_rows twin where rows are not "
                   "whole 64-bit words)")
    c.add_argument("-o", "--output", help="output .spfq file (default: <model>.spfq)")
    c.add_argument("--report-json", help="also write the per-layer report as JSON")
    c.add_argument("-q", "--quiet", action="store_true", help="no progress bar")
    c.set_defaults(func=cmd_compress)

    i = sub.add_parser("inspect", help="bits/weight, sparsity, sizes of a .spfq file")
    i.add_argument("file")
    i.add_argument("--json", action="store_true", help="print the layer table as JSON")
    i.set_defaults(func=cmd_inspect)

    e = sub.add_parser("export", help="write deployable artifacts (ONNX flavours + custom-op libraries, "
                                      "TVM-compiled libraries) for a target")
    e.add_argument("file", help="the .spfq file")
    e.add_argument("-o", "--output", required=True, help="output directory (created atomically)")
    e.add_argument("--format", choices=["onnx", "tvm", "all"], default="onnx",
                   help="onnx: the ONNX flavours (default); tvm: a TVM-compiled model.<target>.so per target "
                        "(+ the host's) with the packed kernels linked in; all: both in one folder")
    e.add_argument("--target", help="target name from targets/*.toml (default: this machine); a GPU target "
                                    "(cuda) adds lib/cuda/libspfq_cuda.so + manifest.cuda.json to the host's "
                                    "CPU artifacts")
    e.add_argument("--target-file", metavar="PATH", help="a target described by your own TOML file (same keys as "
                                                          "targets/*.toml; it names the compilers that get run)")
    e.add_argument("--activations", choices=["int8", "float"], default="int8",
                   help="custom-op flavour and TVM: int8 (activations quantised per row, integer kernels; default) "
                        "or float (weight-only kernels, parity with the dequantised model)")
    e.add_argument("--flavours", default="custom,stock,qonnx",
                   help="comma-separated ONNX flavours to write (custom, stock, qonnx)")
    e.add_argument("--tune-trials", metavar="N",
                   help="TVM: MetaSchedule-tune the host library's float part with N measured trials on static "
                        "copies at the --tune-shape sizes (default 0: untuned); the database is written to "
                        "OUT_DIR/tvm_tuning/")
    e.add_argument("--tune-db", metavar="DIR", help="TVM: start from an earlier export's OUT_DIR/tvm_tuning/ "
                                                    "(read only; its records are reused, not tuned again)")
    e.add_argument("--tune-shape", action="append", default=[], metavar="AXIS=SIZE,...",
                   help="TVM: the dynamic axes' sizes of one tuned static copy (repeatable; default batch=1, other "
                        "axes at the example inputs' sizes), e.g. batch=1,sequence=128")
    e.add_argument("--model", help="model factory path.py:function (default: the one recorded in the file)")
    e.add_argument("--force", action="store_true", help="replace the output directory if it is an earlier "
                                                        "spfq-deploy export or empty (anything else is refused)")
    e.set_defaults(func=cmd_export)

    v = sub.add_parser("validate", help="check every artifact of an export folder against the PyTorch reference "
                                        "(exit 1 when one fails its tolerance)")
    v.add_argument("folder", help="the export folder (spfq-deploy export -o OUT_DIR)")
    v.add_argument("--target", action="append", help="only this target (repeatable; default: every one found, "
                                                     "plus a cuda line; cuda runs the compressed layers on the GPU)")
    v.add_argument("--data", help=".npz with the model's input names (default: OUT_DIR/inputs.npz)")
    v.add_argument("--json", help="also write the report as JSON to this file")
    v.add_argument("--report", help="also write the markdown report (spfq-deploy report) to this file")
    v.set_defaults(func=cmd_validate)

    b = sub.add_parser("bench", help="latency of the folder's host artifacts against the fp32 model "
                                     "(median, p10/p90 per batch size and thread count)")
    b.add_argument("folder", help="the export folder (spfq-deploy export -o OUT_DIR)")
    b.add_argument("--target", help="whose artifacts to time (default and only choice: this host)")
    b.add_argument("--batch", type=_ints, default=(1, 8), help="comma-separated batch sizes (default 1,8)")
    b.add_argument("--threads", type=_ints, default=(1,), help="comma-separated thread counts (default 1)")
    b.add_argument("--warmup", type=int, default=3, help="untimed calls per cell (default 3)")
    b.add_argument("--repeat", type=int, default=20, help="timed calls per cell (default 20)")
    b.add_argument("--json", help="also write the results as JSON to this file")
    b.add_argument("--chart", help="also write a PNG bar chart to this file")
    b.set_defaults(func=cmd_bench)

    g = sub.add_parser("generate", help="decoders: greedy text generation with an export folder's ONNX model on "
                                        "this host, with tokens/s")
    g.add_argument("folder", help="the export folder of a decoder (spfq-deploy export -o OUT_DIR)")
    g.add_argument("--prompt", required=True, help="the text to continue")
    g.add_argument("--max-new-tokens", type=_positive_int, default=64, help="tokens to generate (default 64)")
    g.add_argument("--threads", type=_positive_int, default=1, help="threads (default 1)")
    g.add_argument("--flavour", choices=["custom", "stock"], default="custom",
                   help="custom: packed ai.spfq kernels (default); stock: MatMulNBits / DequantizeLinear")
    g.add_argument("--json", help="also write the result as JSON to this file")
    g.set_defaults(func=cmd_generate)

    r = sub.add_parser("report", help="markdown report of export folders: compression, parity, latency, "
                                      "task accuracy, PNG figures")
    r.add_argument("folders", nargs="+", metavar="OUT_DIR", help="export folders")
    r.add_argument("-o", "--output", required=True, help="the report (.md); figures go next to it")
    r.add_argument("--validate-json", action="append", default=[],
                   help="validate --json output (repeatable; matched to folders by its 'folder'; "
                        "default: OUT_DIR.validate.json when present)")
    r.add_argument("--bench-json", action="append", default=[],
                   help="bench --json output (repeatable; default: OUT_DIR.bench.json when present)")
    r.add_argument("--no-task", action="store_true", help="skip the model file's evaluate() (task accuracy)")
    r.add_argument("--task-only", action="append", default=[], metavar="GLOB",
                   help="run evaluate() only for folders whose name matches (repeatable; e.g. 'mnist*')")
    r.set_defaults(func=cmd_report)
    return p


def _ints(text: str) -> tuple[int, ...]:
    try:
        vals = tuple(int(x) for x in text.split(",") if x.strip())
    except ValueError:
        raise argparse.ArgumentTypeError(f"comma-separated positive integers, got {text!r}") from None
    if not vals or any(v < 1 for v in vals):
        raise argparse.ArgumentTypeError(f"comma-separated positive integers, got {text!r}")
    return vals


def _check_output_path(path: Path, flag: str) -> None:
    """Fail before the (slow) compression when an output cannot be written: a directory, a missing
    or non-directory parent, or a parent we cannot create files in (a real write probe: root
    ignores permission bits, a read-only mount does not)."""
    import os
    import tempfile

    if path.is_dir():
        raise SpfqError(f"{flag} {path}: is a directory")
    parent = path.parent
    if not parent.exists():
        raise SpfqError(f"{flag} {path}: output directory {parent} does not exist")
    if not parent.is_dir():
        raise SpfqError(f"{flag} {path}: {parent} is not a directory")
    try:
        fd, probe = tempfile.mkstemp(dir=parent, prefix=f".{path.name}.", suffix=".tmp")
        os.close(fd)
        os.unlink(probe)
    except OSError as exc:
        raise SpfqError(f"{flag} {path}: cannot write in {parent}: {exc.strerror or exc}") from None


def _same_file(a: Path, b: Path) -> bool:
    try:
        return a.resolve() == b.resolve()
    except OSError:
        return False


def _group_size(text: str | None) -> int:
    """--group-size: 32, 64 or 128 input columns per scale (absent: 0, one scale per row)."""
    from .compress.config import GROUP_SIZES

    if text is None:
        return 0
    if text.strip() not in tuple(str(g) for g in GROUP_SIZES):
        raise SpfqError(f"--group-size {text}: must be one of {', '.join(map(str, GROUP_SIZES))} "
                        "(input columns per float16 scale)")
    return int(text)


def _one_line_warning(message, category, filename, lineno, file=None, line=None):
    """A warning of compress as `spfq-deploy: warning: ...` (one line, no source echo)."""
    text = str(message).strip().splitlines()[0] if str(message).strip() else category.__name__
    ours = "spfq_deploy" in str(filename) or category.__module__.startswith("spfq_deploy")
    print(f"spfq-deploy: warning: {text if ours else f'{category.__name__}: {text}'}", file=sys.stderr)


def _budget_options(args):
    """(budget, candidates) of --bits-budget / --bits-candidates, checked before the model is
    built: (None, None) without a budget."""
    from .compress.budget import parse_budget, parse_candidates

    if args.bits_budget is None:
        if args.bits_candidates is not None:
            raise SpfqError("--bits-candidates chooses widths for --bits-budget: give --bits-budget B as well")
        return None, None
    if args.bits is not None:
        raise SpfqError("--bits-budget chooses each layer's width: give it or --bits, not both")
    if args.layout:
        raise SpfqError("--bits-budget counts the storage of each layer's own layout: --layout cannot be "
                        "given with it")
    if args.layer_bits:
        raise SpfqError("--bits-budget chooses each layer's width: give it or --layer-bits, not both")
    if args.sparsity > 0:
        raise SpfqError("--bits-budget with --sparsity is not supported: pruned layers' storage depends on "
                        "their codes")
    return parse_budget(args.bits_budget), parse_candidates(args.bits_candidates)


def cmd_compress(args) -> int:
    import os
    import warnings

    from .compress import CompressConfig, compress_model, distributed
    from .compress.calibration import spread_line as calib_spread_line
    from .compress.checkpoint import side_file
    from .modelspec import DEFAULT_FACTORY, calibration_label, load_calibration, load_model, split_spec
    from .pack import LAYOUTS, container
    from .tables import budget_summary, compression_summary

    group_size = _group_size(args.group_size)
    budget, candidates = _budget_options(args)
    cfg = CompressConfig(bits=4 if args.bits is None else args.bits, method=args.method, sparsity=args.sparsity,
                         order=args.order, scale=args.scale, damp=args.damp, act_order=args.act_order,
                         ridge=args.ridge, c_grid=args.c_grid, per_layer_delta=args.per_layer_delta,
                         group_size=group_size, range_quantile=args.range_quantile,
                         bias_correction=args.bias_correction, rescale=args.rescale,
                         fold_batchnorm=not args.no_fold_bn, include=tuple(args.include or ["*"]),
                         exclude=tuple(args.exclude), seed=args.seed, batch_size=args.batch_size)
    model_path = split_spec(args.model, DEFAULT_FACTORY)[0]
    out = Path(args.output or model_path.with_suffix(".spfq").name)
    report_path = Path(args.report_json) if args.report_json is not None else None
    # every check that needs no model runs before the model is built and compressed
    _check_output_path(out, "-o")
    if report_path is not None:
        _check_output_path(report_path, "--report-json")
        if _same_file(report_path, out):
            raise SpfqError(f"--report-json {report_path} is the -o file: each needs its own path")
    calib_path = split_spec(args.calib, "calibration")[0] if args.calib else None
    for flag, target in (("-o", out), ("--report-json", report_path)):
        for what, src in (("model file", model_path), ("calibration file", calib_path)):
            if target is not None and src is not None and _same_file(target, src):
                raise SpfqError(f"{flag} {target} is the {what}: it would be overwritten")
    if args.layout and args.layout not in LAYOUTS:
        raise SpfqError(f"--layout {args.layout}: unknown layout (known: {', '.join(LAYOUTS)})")

    if args.threads is not None:
        import torch
        torch.set_num_threads(args.threads)
    comm = distributed.from_env()  # torchrun: the ranks share the work, rank 0 writes
    # warnings are held back until the run succeeds: a failed run ends with its one error line
    with warnings.catch_warnings(record=True) as caught:
        model, module = load_model(args.model)
        if args.layer_bits:
            from .compress.engine import layer_widths
            cfg = replace(cfg, layer_bits=layer_widths(model, cfg, args.layer_bits))
        data = load_calibration(args.calib, module, cfg.batch_size)
        side = side_file(out)
        if args.resume and not side.exists() and comm.root:
            print(f"spfq-deploy: note: --resume: no {side} yet, starting from the first layer", file=sys.stderr)
        try:
            options = dict(progress=not args.quiet, model_spec=args.model,
                           source=calibration_label(args.calib, args.model), engine=args.engine,
                           memory_budget=args.memory_budget, comm=comm)
            if budget is None:
                result = compress_model(model, data, cfg, checkpoint=side, resume=args.resume, **options)
            else:
                from .compress.budget import compress_with_budget
                result = compress_with_budget(model, data, cfg, budget, candidates, checkpoint=side,
                                              resume=args.resume, **options)
        except SpfqError:  # bad input: nothing to resume from
            if not args.resume and comm.root:
                side.unlink(missing_ok=True)
            raise
        except RuntimeError as exc:  # gloo: another rank died (its own error line says why)
            if comm.world > 1:
                raise SpfqError(f"rank {comm.rank}: stopped: another rank of the torchrun run failed "
                                f"({str(exc).splitlines()[0][:120]})") from None
            raise
    if not comm.root:  # rank 0 alone writes the file and prints the summary
        try:
            comm.close()
        except RuntimeError:  # rank 0 stopped before the end (its own error line says why)
            err = SpfqError("rank 0 failed")
            err.reported_by_root = True
            raise err from None
        return 0
    layouts = {n: args.layout for n in result.model.layers} if args.layout else None
    # with a report, the .spfq is staged next to its target and renamed only once the report is
    # written: a failed report leaves neither file (both are written atomically)
    target = out if report_path is None else out.parent / f".{out.name}.{os.getpid()}.staged"
    try:
        try:
            table = container.save(target, result.model, layouts)
        except ValueError as exc:  # a layout that cannot hold these codes
            raise SpfqError(f"--layout {args.layout}: {exc}") from None
        if report_path is not None:
            from . import atomic
            try:
                atomic.write_text(report_path, json.dumps([r.as_dict() for r in result.report], indent=2))
            except OSError as exc:
                raise SpfqError(f"--report-json {report_path}: cannot write: {exc.strerror or exc}") from None
            if out.exists():
                os.chmod(target, out.stat().st_mode & 0o7777)
            os.replace(target, out)
    finally:
        if target != out and os.path.lexists(target):
            os.unlink(target)
    side.unlink(missing_ok=True)  # the run is complete: its resume state is no longer needed
    for w in {(str(w.message), w.category, w.filename): w for w in caught}.values():
        _one_line_warning(w.message, w.category, w.filename, w.lineno)
    print(compression_summary(result.report))
    print(f"\ncalibration: {calib_spread_line(result.model.meta['calibration_spread'])}")
    if "bits_budget" in result.model.meta:
        print("\n" + budget_summary(result.model.meta["bits_budget"], result.model.meta.get("layer_order"),
                                    result.engine.get("budget_seconds")))
    eng = result.engine
    if eng.get("engine") == "sequential":
        spilled = f", {eng['spilled_bytes'] / 2 ** 20:,.0f} MiB spilled to disk" if eng["spilled_bytes"] else ""
        print(f"\nengine: sequential (live activations peaked at {eng['peak_activation_bytes'] / 2 ** 20:,.0f} MiB "
              f"in RAM{spilled})")
    else:
        print("\nengine: replay")
    if comm.world > 1:
        print(f"ranks: {comm.world} (torch.distributed, gloo): batches and candidates split, rank 0 wrote the file")
        comm.close()
    bits = sum(e["storage_report"]["total_bits"] for e in table["layers"].values())
    weights = sum(e["storage_report"]["weights"] for e in table["layers"].values())
    print(f"\nwrote {out} ({out.stat().st_size:,} bytes; {len(table['layers'])} layers at "
          f"{bits / weights:.4f} bits/weight incl. scales and padding)")
    return 0


def cmd_inspect(args) -> int:
    from .pack import container
    from .tables import inspect_table

    header = container.read_header(args.file)
    container.load(args.file)  # verify every checksum and layout before reporting on the file
    if args.json:
        print(json.dumps({k: v for k, v in header.items() if k != "sha256"}, indent=2))
    else:
        print(inspect_table(header))
    return 0


def cmd_export(args) -> int:
    from .export import export

    flavours = tuple(f.strip() for f in args.flavours.split(",") if f.strip())
    formats = ("onnx", "tvm") if args.format == "all" else (args.format,)
    tune = None
    if args.tune_trials is not None or args.tune_db is not None or args.tune_shape:
        from .export.tvm.tuning import TuneOptions, parse_shape

        if "tvm" not in formats:
            raise SpfqError("--tune-trials / --tune-db / --tune-shape tune the TVM library: use them with "
                            "--format tvm or all")
        trials = (args.tune_trials or "0").strip()
        if not trials.isdigit():
            raise SpfqError(f"--tune-trials {args.tune_trials}: give a whole number of trials >= 0")
        tune = TuneOptions(trials=int(trials), db=Path(args.tune_db) if args.tune_db else None,
                           shapes=[parse_shape(s) for s in args.tune_shape])
        if args.tune_shape and not tune.enabled:
            raise SpfqError("--tune-shape: give --tune-trials N (N > 0) or --tune-db DIR as well")
    export(args.file, args.output, formats=formats, target=args.target, target_file=args.target_file,
           activations=args.activations, flavours=flavours, force=args.force, model_spec=args.model, tune=tune)
    return 0


def cmd_validate(args) -> int:
    from .validate import table, to_json, validate

    for opt, dest in (("--json", args.json), ("--report", args.report)):  # before the (long) run
        if dest and Path(dest).is_dir():
            raise SpfqError(f"{opt} {dest}: is a directory (give a file name)")
        if dest and not Path(dest).parent.is_dir():
            raise SpfqError(f"{opt} {dest}: output directory {Path(dest).parent} does not exist")
    report = validate(args.folder, targets=args.target, data=args.data)
    print(table(report))
    if args.json:
        from .atomic import write_text
        write_text(args.json, to_json(report))
    if args.report:
        from .report import write_report

        print(f"wrote {write_report([args.folder], args.report, validate_docs=[json.loads(to_json(report))])}")
    return 0 if report["passed"] else 1


def cmd_bench(args) -> int:
    from .bench import bench, table

    doc = bench(args.folder, target=args.target, batches=args.batch, threads=args.threads, warmup=args.warmup,
                repeat=args.repeat)
    print(table(doc))
    if args.json:
        from .atomic import write_text
        write_text(args.json, json.dumps(doc, indent=1) + "\n")
    if args.chart:
        from .bench.charts import latency_chart
        print(f"wrote {latency_chart(doc, args.chart)}")
    return 0


def cmd_generate(args) -> int:
    from .generate import generate

    res = generate(args.folder, args.prompt, args.max_new_tokens, args.threads, args.flavour)
    print(args.prompt + res["text"])
    rate = res["decode_tokens_per_second"]
    print(f"\n{res['prompt_tokens']} prompt tokens in {res['prefill_seconds']:.3f} s; {len(res['generated'])} new "
          f"tokens, decode {'-' if rate is None else f'{rate:.1f}'} tokens/s ({args.flavour}, {args.threads} "
          f"thread{'s' if args.threads > 1 else ''})")
    if args.json:
        from .atomic import write_text
        write_text(args.json, json.dumps(res, indent=1) + "\n")
    return 0


def cmd_report(args) -> int:
    from .report import write_report

    path = write_report(args.folders, args.output, validate_files=args.validate_json, bench_files=args.bench_json,
                        task=not args.no_task, task_only=args.task_only)
    print(f"wrote {path}")
    return 0


def _rank_label(exc: SpfqError) -> str | None:
    """'' in a plain run; in a torchrun run 'rank N: ' for a rank's own failure, and None (say
    nothing) where rank 0 already reports the same error (distributed.Comm.check)."""
    dist = sys.modules.get("spfq_deploy.compress.distributed")
    comm = dist.current() if dist is not None else None
    if comm is None or comm.world == 1 or comm.root:
        return ""
    return None if getattr(exc, "reported_by_root", False) else f"rank {comm.rank}: "


def main(argv: list[str] | None = None) -> int:
    parser = build_parser()
    args = parser.parse_args(argv)
    watch_interrupts()
    try:
        return args.func(args)
    except SpfqError as exc:
        who = _rank_label(exc)
        if who is not None:
            print(f"spfq-deploy: error: {who}{exc}", file=sys.stderr)
        return exc.exit_code
    except KeyboardInterrupt:
        # every output is staged and renamed at the end, so an interrupt leaves nothing half written
        print("spfq-deploy: error: interrupted (nothing was written)", file=sys.stderr)
        return 130


if __name__ == "__main__":
    sys.exit(main())
