"""Task instructions, OFA style: every task is "encoder segments → target"; the text segment of the source is
one of these prompts. Each task's prompt is defined in its spec (:mod:`zoo.task_specs`); this module names
them together (and holds grounding's, whose task has no spec yet).
"""
from __future__ import annotations

from zoo.task_specs.caption import CAPTION_PROMPT
from zoo.task_specs.sensor_to_text import SENSOR_PROMPT
from zoo.task_specs.text_to_image import T2I_PROMPT, t2i_prompt

__all__ = ["CAPTION_PROMPT", "SENSOR_PROMPT", "T2I_PROMPT", "GROUNDING_PROMPT", "t2i_prompt"]

#: ``[image] which region does the text describe? text: <phrase>`` → four location tokens (visual grounding)
GROUNDING_PROMPT = "which region does the text describe? text: {}"
