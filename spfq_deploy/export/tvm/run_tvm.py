#!/usr/bin/env python3
"""Run a TVM-exported spfq model on the device: copied into the export folder as run_tvm.py.

Needs only the runtime packages: numpy, apache-tvm (its runtime: the Relax VM) and
apache-tvm-ffi, at the versions the manifest names; no torch, no spfq-deploy.

    python run_tvm.py model.arm64.so inputs.npz -o outputs.npz
    python run_tvm.py a.so a.npz b.so b.npz -o a_out.npz -o b_out.npz   # several in one process

Inputs are the arrays of the .npz in file order (the model's argument order, as inputs.npz
from the export holds them). Prints one JSON line per library: output shapes, seconds per run,
the packed kernel calls the library counted (spfq_tvm_calls: > 0 proves the packed path ran)
and the library's kernel ISA. Several LIBRARY INPUTS pairs share one process (one `import tvm`,
which takes ~20 s under qemu-user emulation).
"""

from __future__ import annotations

import argparse
import json
import sys
import time

import numpy as np


def _flatten(value):
    if hasattr(value, "numpy"):
        return [value.numpy()]
    out = []
    for item in value:
        out.extend(_flatten(item))
    return out


def main(argv=None) -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("runs", nargs="+", metavar="LIBRARY INPUTS",
                   help="model.<target>.so and the .npz of its inputs, in argument order (pairs)")
    p.add_argument("-o", "--output", action="append", default=[],
                   help="write the outputs here (.npz: output_0, output_1, ...); once per pair, in order")
    p.add_argument("--repeat", type=int, default=1, help="time this many runs (default 1)")
    args = p.parse_args(argv)
    if len(args.runs) % 2:
        p.error("give LIBRARY INPUTS pairs")
    pairs = list(zip(args.runs[0::2], args.runs[1::2]))
    if args.output and len(args.output) != len(pairs):
        p.error(f"{len(pairs)} LIBRARY INPUTS pairs but {len(args.output)} -o files")

    import tvm
    from tvm.runtime.vm import VirtualMachine

    for i, (library, inputs) in enumerate(pairs):
        with np.load(inputs) as data:
            arrays = [np.ascontiguousarray(data[k]) for k in data.files]
        lib = tvm.runtime.load_module(library)
        vm = VirtualMachine(lib, tvm.cpu())
        dev_inputs = [tvm.runtime.tensor(a) for a in arrays]
        outs = None
        t0 = time.perf_counter()
        for _ in range(max(1, args.repeat)):
            outs = _flatten(vm["main"](*dev_inputs))
        seconds = (time.perf_counter() - t0) / max(1, args.repeat)
        calls = int(lib.get_function("spfq_tvm_calls", query_imports=True)())
        info = str(lib.get_function("spfq_tvm_library_info", query_imports=True)())
        if args.output:
            np.savez(args.output[i], **{f"output_{j}": o for j, o in enumerate(outs)})
        print(json.dumps({"library": library, "inputs": inputs, "outputs": [list(o.shape) for o in outs],
                          "seconds_per_run": seconds, "spfq_tvm_calls": calls, "library_info": info,
                          "tvm": tvm.__version__}), flush=True)
    return 0


if __name__ == "__main__":
    sys.exit(main())
