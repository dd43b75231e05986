"""`spfq-deploy bench OUT_DIR`: host latency of an export folder's artifacts against fp32.

    core.py    the plan (which artifacts run on this host, the fp32 baseline, the batches),
               one worker process per thread count, the JSON document
    worker.py  the timing process (thread pools are sized once per process: SPFQ_NUM_THREADS,
               TVM_NUM_THREADS, onnxruntime intra-op threads)
    charts.py  PNG bar charts (latency per artifact x batch x threads; parity per validate row)
"""

from .core import bench, table  # noqa: F401
