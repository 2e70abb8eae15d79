"""Entry points: ``zoo-train``, ``zoo-eval``, ``zoo-finetune``, ``zoo-export`` and what only they use (pre-flight
checks, ``--help`` text). Nothing outside this package imports it."""
