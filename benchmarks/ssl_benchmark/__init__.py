"""A few-label segmentation benchmark of self-supervised pre-training methods on real scans:
``python -m benchmarks.ssl_benchmark`` (``make ssl-benchmark``); ``--quick`` for a smoke run."""
