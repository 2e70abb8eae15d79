"""Captioning: ``[image] what does the image describe?`` → caption text."""
from __future__ import annotations

from zoo.task_specs.base import TaskSpec, register_task_spec

#: ``[image] what does the image describe?`` → caption text
CAPTION_PROMPT = "what does the image describe?"

CAPTION = register_task_spec(TaskSpec("caption", method="caption", prompt=CAPTION_PROMPT,
                                      card_example="print(bundle.caption(['image.png']))"))
