"""Training and evaluation: Lightning tasks, datamodules and data formats, metrics, Hydra entry points.

Layout (imports go down this list only; ``tests/test_import_graph.py`` checks it and that there is no cycle):
``tasks.cli`` the entry points (``zoo-train``, ``zoo-eval``, ``zoo-finetune``, ``zoo-export``); the task modules
(``caption``, ``vqa``, ``text_to_image``, ``layout_t2i``, ``sensor_to_text``, ``multitask``, ``distill``) on
``tasks.base``; ``tasks.tools`` (VQ image tokenizer, attribute probe, backbone pretraining); ``tasks.checkpoint``
and ``tasks.adapters``; ``tasks.runtime`` (Lightning/Hydra glue) and ``tasks.data``.
"""
