"""``zoo-serve``: an HTTP server (FastAPI + uvicorn) for every task a pretrained model has.

Layout: :mod:`zoo.serve.preprocess` (CPU work: decoding, resizing, tokenizing, PNG rendering; runs in a pool of
worker processes), :mod:`zoo.serve.runner` (the model side: ready tensors in, batched generate out),
:mod:`zoo.serve.batching` (the dynamic batcher), :mod:`zoo.serve.metrics`, :mod:`zoo.serve.schemas`,
:mod:`zoo.serve.app` (routes and error handling) and :mod:`zoo.serve.cli` (the console script).
"""
