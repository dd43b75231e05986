"""`python -m spfq_deploy ...` is the spfq-deploy command (torchrun needs a module to start)."""

import sys

from .cli import main

sys.exit(main())
