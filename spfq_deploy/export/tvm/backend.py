"""The TVM backend of an export job: the compressed model compiled by Apache TVM into one shared
library per target, the packed layers calling the project's C kernels linked inside it.

    OUT/model.<target>.so   Relax VM executable + TVM-generated code for the float ops + the C
                            kernels and their tvm-ffi wrapper (kernels/tvm/spfq_tvm_ops.cc);
                            packed weights are constants in it. The target's, and the host's.
    OUT/run_tvm.py          runs a library with only numpy + apache-tvm(-ffi) on the device
    OUT/manifest.tvm.json   versions, TVM target dicts, per-layer kernel layouts, sha256 of files
    OUT/tvm_tuning/         with --tune-trials / --tune-db: the MetaSchedule database the host
                            library was compiled with (tuning.py)
(model.spfq and inputs.npz are the job's, shared by every backend.)

Path: torch.export of the reference model with a marker op per compressed layer (graph.py) ->
Relax (from_exported_program + custom_convert_map emitting R.call_dps_packed("spfq_packed_layer",
...)) -> compile.py for each target.
"""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import numpy as np

from . import compile as tvm_compile
from . import graph, library, tuning
from .runtime import elf_machine, library_info, library_name

RUNNER = Path(__file__).with_name("run_tvm.py")


class Backend:
    """Checks the targets' compilers and builds the kernel objects at construction (before the
    slow tracing), traces in prepare(), compiles and writes in write(stage)."""

    MANIFEST = "manifest.tvm.json"

    def __init__(self, job, dynamic: bool = True, tune: tuning.TuneOptions | None = None):
        self.job, self.dynamic = job, dynamic
        self.tune = tune if tune is not None and tune.enabled else None
        if self.tune is not None:  # before the slow tracing
            if self.tune.db is not None:
                tuning.check_db(self.tune.db, probe_first=True)
            else:
                tuning.check_meta_schedule()
        for t in job.cpu_targets:
            t.require(t.cc, t.cxx)
            tvm_compile.tvm_target(t)  # a bad [tvm] table fails now, not after tracing
            library.build(t)
        self.mod = self.layers = self.dynamic_axes = None

    def prepare(self) -> None:
        src = self.job.source
        self.job.log(f"tracing {src.spec} with torch.export and importing it into Relax ...")
        self.mod, self.layers, self.dynamic_axes = tvm_compile.build_module(
            src.model, src.cm, src.inputs, self.job.activations, self.dynamic, self.job.log)
        self.shapes = None
        if self.tune is not None:
            self.mod, self.shapes = tuning.specialise(self.mod, src.inputs, self.tune.shapes, self.job.log)

    def write(self, stage: Path) -> tuple[dict, list[str]]:
        import tvm
        import tvm_ffi

        job, libs, own = self.job, {}, []
        database, tuned = None, None
        if self.tune is not None:
            db_dir = stage / tuning.DB_DIR
            job.log(f"tuning the float part for {job.host.name} with MetaSchedule ({self.tune.trials} trials"
                    + (f", starting from {self.tune.db}" if self.tune.db is not None else "") + ") ...")
            tuned = tuning.tune(self.mod, tvm_compile.tvm_target(job.host), db_dir, self.tune, log=job.log)
            tuned["shapes"] = self.shapes
            database = tuning.open_db(db_dir)
            own += [f"{tuning.DB_DIR}/{f}" for f in tuning.DB_FILES]
            job.log(f"  {tuned['tasks']} static tasks: {tuned['tasks_from_db']} from the database, "
                    f"{tuned['tasks_tuned']} tuned ({tuned['trials_measured']} trials) in {tuned['tuning_seconds']} s")
            untuned = [t.name for t in job.cpu_targets if t.name != job.host.name]
            if untuned:
                job.log(f"warning: only the host library ({job.host.name}) is tuned; {', '.join(untuned)} "
                        "compiled untuned (MetaSchedule measures on this machine)")
        for t in job.cpu_targets:
            job.log(f"compiling for {t.name} (TVM {json.dumps(t.tvm)}, {t.cxx}) ...")
            db = database if t.name == job.host.name else None
            path = tvm_compile.compile_library(self.mod, t, stage / library_name(t.name), database=db, log=job.log)
            own.append(path.name)
            libs[t.name] = {"file": path.name, "elf_machine": elf_machine(path), "tvm_target": dict(t.tvm),
                            "cxx": t.cxx, "cflags": list(t.cflags), "kernel_isa": t.kernel_isa}
            job.log(f"  {path.name}: {path.stat().st_size:,} bytes")
        if job.host.name in libs:
            libs[job.host.name]["library_info"] = library_info(stage / library_name(job.host.name))
        shutil.copyfile(RUNNER, stage / "run_tvm.py")
        own.append("run_tvm.py")
        inputs = job.source.inputs
        fields = job.manifest_base("tvm", stage, {"tvm": tvm.__version__, "tvm_ffi": tvm_ffi.__version__})
        fields["inputs"].update({
            "shapes": {n: list(np.shape(a)) for n, a in zip(inputs.input_names, inputs.args)},
            # the axes that stayed symbolic in the compiled program (any size runs there)
            "dynamic_axes": self.dynamic_axes})
        fields.update({
            # the device needs exactly these (mismatched tvm / tvm-ffi versions break silently)
            "runtime_packages": ["numpy", f"apache-tvm=={tvm.__version__}", f"apache-tvm-ffi=={tvm_ffi.__version__}"],
            "run": f"python run_tvm.py {library_name(job.target.name)} inputs.npz -o outputs.npz",
            "packed_function": graph.PACKED_FUNC, "attrs": list(graph.ATTR_FIELDS),
            "libraries": libs, "layers": self.layers,
        })
        if tuned is not None:
            fields["tuning"] = {**tuned, "database": tuning.DB_DIR, "target": job.host.name}
        return fields, own
