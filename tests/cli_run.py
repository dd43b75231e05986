"""The one way the test files run the command line in-process: (exit code, stdout, stderr)."""

from __future__ import annotations

from spfq_deploy.cli import main


def run_cli(capsys, *argv):
    """main(argv) with every argument as a string; an argparse usage error's SystemExit becomes
    its exit code, so bad-input tests read it like any other."""
    try:
        code = main([str(a) for a in argv])
    except SystemExit as exc:
        code = exc.code
    out = capsys.readouterr()
    return code, out.out, out.err
