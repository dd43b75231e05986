"""spfq-deploy: SPFQ post-training compression, bit-packed artifacts, deployment checks."""

__version__ = "0.1.0"
