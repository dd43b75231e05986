"""MetaSchedule tuning of the TVM export's float part (issue 15): `export --tune-trials N
[--tune-db DIR] [--tune-shape AXIS=SIZE,...]`.

Untuned, the float part gets the export's fixed schedules (schedule.py: attention matmuls,
row reductions, elementwise; pooling and float convs stay plain loops). MetaSchedule finds
schedules by measuring candidates, which needs concrete shapes, and the exported program has
symbolic axes (batch, sequence). So tuning works on static specialisations:

    main(x: (n, ...))                 the library's entry, a dispatcher:
        if n == 1 [and s == 128 ...]:  main_static_0(x as (1, ...))   tuned, static shapes
        else:                          main_dynamic(x)                the untuned program
    main_static_k                      the traced program with its symbolic axes bound to the
                                       k-th --tune-shape (default: batch 1, other axes at the
                                       trace inputs' sizes)

Only the static functions' fused TIR is tuned (the dynamic copy stays exactly what an untuned
export compiles); MetaScheduleApplyDatabase then swaps in the best schedule of each workload the
database holds, and the fixed schedules take the rest. The packed layers are calls into the C
kernels in either branch.

The database (MetaSchedule's JSON database: database_workload.json + database_tuning_record.json)
is written into the export folder (OUT/tvm_tuning/). --tune-db DIR copies an earlier one in
first: workloads it already has a record for are applied and not tuned again, the others are
tuned within the --tune-trials budget and added to the copy; DIR itself is only read.

Measurements are timings, so the records chosen can differ from run to run even with the same
seed: same database -> same library bytes, but not the same database from the same trials.
"""

from __future__ import annotations

import os
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path

from ...errors import SpfqError

DB_DIR = "tvm_tuning"
DB_FILES = ("database_workload.json", "database_tuning_record.json")
STATIC_PREFIX = "main_static_"
DYNAMIC_NAME = "main_dynamic"
SEED = 0


@dataclass
class TuneOptions:
    trials: int = 0
    db: Path | None = None  # an earlier database folder to start from (read only)
    shapes: list[dict] = field(default_factory=list)  # [{axis name: size}]; [] = the default
    seed: int = SEED

    @property
    def enabled(self) -> bool:
        return self.trials > 0 or self.db is not None


def parse_shape(text: str) -> dict:
    """'batch=1,sequence=128' -> {'batch': 1, 'sequence': 128}."""
    out = {}
    for part in (p.strip() for p in text.split(",")):
        name, eq, size = part.partition("=")
        if not part or not eq or not name.strip() or not size.strip().isdigit() or int(size) < 1:
            raise SpfqError(f"--tune-shape {text!r}: expected AXIS=SIZE[,AXIS=SIZE...] with sizes >= 1 "
                            "(e.g. batch=1,sequence=128)")
        out[name.strip()] = int(size)
    return out


_PROBE = "import tvm; tvm.ir.save_json(tvm.tirx.IntImm('int64', 1))"


def check_meta_schedule() -> None:
    """MetaSchedule serialises every workload and candidate (tvm.ir.save_json: the JSON database,
    the builder and runner processes). With apache-tvm 0.27.0.post1 + apache-tvm-ffi 0.1.15.post2
    that call segfaults on any TIR node (in tvm::ffi::ToJSONGraph), which would kill the export
    after the slow tracing; probe it in a child process first and refuse with one line."""
    import subprocess
    import sys

    r = subprocess.run([sys.executable, "-c", _PROBE], capture_output=True, text=True)
    if r.returncode != 0:
        import tvm
        import tvm_ffi

        why = "segfaults" if r.returncode in (-11, 139) else f"fails (exit {r.returncode})"
        raise SpfqError(f"--tune-trials / --tune-db: MetaSchedule cannot run with this TVM build: tvm.ir.save_json "
                        f"{why} in apache-tvm {tvm.__version__} + apache-tvm-ffi {tvm_ffi.__version__}; "
                        "export without the tuning flags")


def check_db(path: Path, probe_first: bool = False) -> None:
    """A --tune-db folder must be a MetaSchedule JSON database; one line otherwise."""
    path = Path(path)
    if not path.is_dir():
        raise SpfqError(f"--tune-db {path}: not a directory (give the tvm_tuning/ folder of an earlier export)")
    missing = [f for f in DB_FILES if not (path / f).is_file()]
    if missing:
        raise SpfqError(f"--tune-db {path}: not a MetaSchedule database (no {missing[0]}); give the "
                        "tvm_tuning/ folder of an earlier export")
    if probe_first:
        check_meta_schedule()  # reading the database parses its IR (load_json)
    try:
        open_db(path, allow_missing=False)
    except Exception as exc:
        from .compile import reason

        raise SpfqError(f"--tune-db {path}: cannot read the database ({reason(exc)})") from None


def open_db(folder: Path, allow_missing: bool = True):
    from tvm.s_tir import meta_schedule as ms

    return ms.database.JSONDatabase(path_workload=str(Path(folder) / DB_FILES[0]),
                                    path_tuning_record=str(Path(folder) / DB_FILES[1]),
                                    allow_missing=allow_missing)


def axis_vars(func, input_names: list[str], dynamic_axes: dict) -> dict:
    """{axis name: the symbolic tir var of that axis in func's parameters}."""
    from tvm import tirx

    names = {}
    for name, param in zip(input_names, func.params):
        axes = dynamic_axes.get(name, {}) or {}
        shape = param.ty.shape
        for i, dim in enumerate(shape):
            if isinstance(dim, tirx.Var):
                axis = axes.get(i) if isinstance(axes, dict) else None
                names.setdefault(axis or dim.name, dim)
    return names


def default_shape(func, inputs) -> dict:
    """batch 1, every other symbolic axis at the trace inputs' size."""
    import numpy as np
    from tvm import tirx

    out = {}
    names = axis_vars(func, inputs.input_names, inputs.dynamic_axes)
    for name, param, arr in zip(inputs.input_names, func.params, inputs.args):
        for i, dim in enumerate(param.ty.shape):
            if isinstance(dim, tirx.Var):
                axis = next(a for a, v in names.items() if v.same_as(dim))
                out.setdefault(axis, 1 if axis == "batch" else int(np.shape(arr)[i]))
    return out


def specialise(mod, inputs, shapes: list[dict], log=print):
    """(module whose main dispatches to static copies, [{axis: size}] used). A module without
    symbolic axes is returned as it is (it is static already)."""
    import tvm
    from tvm import relax, tirx

    main = mod["main"]
    names = axis_vars(main, inputs.input_names, inputs.dynamic_axes)
    if not names:
        return mod, [{}]
    shapes = shapes or [default_shape(main, inputs)]
    for s in shapes:
        unknown = sorted(set(s) - set(names))
        if unknown:
            raise SpfqError(f"--tune-shape: no dynamic axis {unknown[0]!r} (the program's axes: {', '.join(names)})")
        missing = sorted(set(names) - set(s))
        if missing:
            raise SpfqError(f"--tune-shape {','.join(f'{k}={v}' for k, v in s.items())}: give a size for every "
                            f"dynamic axis ({', '.join(names)}); {missing[0]} is missing")
    rest = tvm.IRModule({gv: f for gv, f in mod.functions.items() if gv.name_hint != "main"}, attrs=mod.attrs)
    bb = relax.BlockBuilder(rest)
    # the untuned program, with its own symbolic vars (a var may be defined in one function only)
    fresh = {v: tirx.Var(v.name, "int64") for v in names.values()}
    gv_dyn = bb.add_func(main.bind_symbolic_vars(fresh).without_attr("global_symbol"), DYNAMIC_NAME)
    params = list(main.params)
    ret_ty = main.ret_ty
    body = None
    for k in reversed(range(len(shapes))):
        sizes = shapes[k]
        static = main.bind_symbolic_vars({names[a]: sizes[a] for a in names}).without_attr("global_symbol")
        gv = bb.add_func(static, f"{STATIC_PREFIX}{k}")
        bindings, args = [], []
        for p, sp in zip(params, static.params):
            v = relax.Var(f"{p.name}_static", sp.ty)
            bindings.append(relax.MatchCast(v, p, sp.ty))
            args.append(v)
        r = relax.Var("out_static", static.ret_ty)
        rc = relax.Var("out", ret_ty)
        bindings += [relax.VarBinding(r, relax.Call(gv, args)), relax.MatchCast(rc, r, ret_ty)]
        branch = relax.SeqExpr([relax.BindingBlock(bindings)], rc)
        if body is None:
            rd = relax.Var("out", ret_ty)
            body = relax.SeqExpr([relax.BindingBlock([relax.VarBinding(rd, relax.Call(gv_dyn, params))])], rd)
        cond = None
        for a in names:
            eq = tirx.EQ(names[a], tirx.IntImm("int64", sizes[a]))
            cond = eq if cond is None else tirx.And(cond, eq)
        body = relax.If(relax.prim_value(cond), branch, body)
    bb.add_func(relax.Function(params, body, ret_ty, is_pure=True, attrs=main.attrs), "main")
    return bb.get(), shapes


def with_cores(target):
    """The target with "num-cores" (MetaSchedule's CPU rules require it; physical cores)."""
    import tvm

    try:
        import psutil

        cores = psutil.cpu_count(logical=False) or os.cpu_count() or 1
    except ImportError:
        cores = os.cpu_count() or 1
    d = dict(target.export())
    d.setdefault("num-cores", int(cores))
    return tvm.target.Target(d)


def relax_pipeline(target, database, fuse: bool = True):
    """The export's CPU pipeline (schedule.py) with MetaScheduleApplyDatabase before the rules
    (functions the database has no record for get the rules' schedules), then the canonical
    shape functions (reproducible.py)."""
    import tvm
    from tvm import relax
    from tvm.relax.backend.cpu_generic import pipeline as cpu

    from .reproducible import canonical_shape_funcs
    from .schedule import apply_rules, fuse_passes

    target = with_cores(target)

    @tvm.transform.module_pass(opt_level=0, name="SpfqTunedPipeline")
    def _pipeline(mod, _ctx):
        with target, database:
            mod = tvm.transform.Sequential(fuse_passes(target, fuse))(mod)
            mod = relax.transform.MetaScheduleApplyDatabase()(mod)
            mod = tvm.transform.Sequential([apply_rules(fuse)] + cpu.dataflow_lower_passes(target)
                                           + cpu.finalize_passes(target))(mod)
        return mod

    return tvm.transform.Sequential([_pipeline, canonical_shape_funcs()])


def _static(func) -> bool:
    from tvm import tirx

    for p in func.params:  # TVM 0.27: a buffer parameter is a Var with a BufferType
        try:
            shape = p.shape
        except AttributeError:
            return False  # a scalar parameter: a symbolic size passed in
        if not all(isinstance(d, tirx.IntImm) for d in shape):
            return False
    return True


def _one_thread() -> None:
    # the runner measures as the benchmarks run: one thread
    os.environ["TVM_NUM_THREADS"] = "1"


def tune(mod, target, db_dir: Path, opts: TuneOptions, log=print, progress: bool = True) -> dict:
    """Tune the static functions of `mod` (see specialise) into the JSON database in db_dir;
    returns what the manifest records. db_dir is created; --tune-db's files are copied in first."""
    import tvm
    from tqdm import tqdm
    from tvm.ir.utils import derived_object
    from tvm.s_tir import meta_schedule as ms
    from tvm.s_tir.meta_schedule.relax_integration import extracted_tasks_to_tune_contexts

    from .schedule import fuse_passes

    t0 = time.perf_counter()
    target = with_cores(target)
    db_dir.mkdir(parents=True, exist_ok=True)
    if opts.db is not None:
        for f in DB_FILES:
            shutil.copyfile(Path(opts.db) / f, db_dir / f)
    database = open_db(db_dir)
    with target:
        fused = tvm.transform.Sequential(fuse_passes(target))(mod)
    tasks = ms.relax_integration.extract_tasks(fused, target)
    static = [t for t in tasks if _static(t.dispatched[0]["main"])]
    known = [t for t in static if database.has_workload(t.dispatched[0])
             and database.get_top_k(database.commit_workload(t.dispatched[0]), 1)]
    todo = [t for t in static if t not in known]
    info = {"trials_requested": opts.trials, "tasks": len(static), "tasks_dynamic_untuned": len(tasks) - len(static),
            "tasks_from_db": len(known), "tasks_tuned": 0, "trials_measured": 0,
            "db_reused": opts.db is not None, "seed": opts.seed}
    if todo and opts.trials > 0:
        work = db_dir / ".work"
        contexts, weights = extracted_tasks_to_tune_contexts(todo, str(work), seed=opts.seed,
                                                             num_threads=max(1, os.cpu_count() or 1))
        bar = tqdm(total=opts.trials, desc=f"tune ({len(todo)} tasks)", unit="trial", disable=not progress,
                   leave=False)

        @derived_object
        class _Progress(ms.measure_callback.PyMeasureCallback):
            def apply(self, task_scheduler, task_id, candidates, builder_results, runner_results):
                info["trials_measured"] += len(candidates)
                bar.update(min(len(candidates), bar.total - bar.n))

        cpus = max(1, os.cpu_count() or 1)
        try:
            ms.tune_tasks(
                tasks=contexts, task_weights=weights, work_dir=str(work), max_trials_global=opts.trials,
                num_trials_per_iter=min(64, max(8, opts.trials // max(1, len(todo)))),
                builder=ms.builder.LocalBuilder(max_workers=cpus),
                runner=ms.runner.LocalRunner(
                    evaluator_config=ms.runner.EvaluatorConfig(number=3, repeat=1, min_repeat_ms=20),
                    initializer=_one_thread),
                database=database, cost_model="random",
                measure_callbacks=list(ms.measure_callback.MeasureCallback.create("default")) + [_Progress()],
                task_scheduler="gradient")
        finally:
            bar.close()
            shutil.rmtree(work, ignore_errors=True)
        info["tasks_tuned"] = len(todo)
    info["tasks_untuned"] = sum(1 for t in todo if not database.get_top_k(database.commit_workload(t.dispatched[0]), 1))
    info["tuning_seconds"] = round(time.perf_counter() - t0, 1)
    return info
