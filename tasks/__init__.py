"""Training and evaluation: Lightning tasks, datamodules and data formats, metrics, Hydra entry points.

Layout: the task modules (``caption``, ``vqa``, ``text_to_image``, ``layout_t2i``, ``sensor_to_text``, ``multitask``,
``distill``) build on ``tasks.base``; ``tasks.cli`` holds the entry points (``zoo-train``, ``zoo-eval``,
``zoo-finetune``, ``zoo-export``), which nothing else imports; ``tasks.tools`` the VQ image tokenizer, the attribute
probe and backbone pretraining; ``tasks.checkpoint`` the checkpoint metadata and reading; ``tasks.adapters`` LoRA
and freezing; ``tasks.runtime`` the Lightning/Hydra glue, which imports no task. ``tests/test_import_graph.py``
checks these rules and that no import cycle exists.
"""
