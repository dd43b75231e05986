"""Task metric of compressed models: `python -m examples.evaluate FILE.spfq [...]`.

Each file's model is rebuilt from the .spfq alone (factory recorded in the file, dequantised
weights from it: spfq_deploy.reference) and scored with its example module's evaluate().
"""

from __future__ import annotations

import sys

from spfq_deploy.errors import SpfqError
from spfq_deploy.modelspec import load_model
from spfq_deploy.pack import container
from spfq_deploy.reference import load_reference


def score(path: str) -> tuple[dict, dict]:
    """(metrics of the fp32 model, metrics of the compressed model rebuilt from the file)."""
    spec = container.read_header(path)["model_spec"]
    fp32, module = load_model(spec)
    evaluate = getattr(module, "evaluate", None)
    if evaluate is None:
        raise SpfqError(f"{spec}: the model file has no evaluate(model) function")
    return evaluate(fp32), evaluate(load_reference(path))


def main(argv: list[str]) -> int:
    if not argv:
        print("usage: python -m examples.evaluate FILE.spfq [FILE.spfq ...]", file=sys.stderr)
        return 2
    try:
        for path in argv:
            base, comp = score(path)
            for key in comp:
                print(f"{path}: {key} = {comp[key]:.4f}  (fp32 {base[key]:.4f}, change {comp[key] - base[key]:+.4f})")
    except SpfqError as exc:
        print(f"error: {exc}", file=sys.stderr)
        return 2
    return 0


if __name__ == "__main__":
    sys.exit(main(sys.argv[1:]))
