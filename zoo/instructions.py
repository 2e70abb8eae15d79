"""Task instructions shared by training (``tasks``) and inference (``zoo.pretrained``), OFA style.

Every task is "encoder segments → target"; the text segment of the source is one of these prompts.
"""
from __future__ import annotations

#: ``[image] what does the image describe?`` → caption text
CAPTION_PROMPT = "what does the image describe?"
#: ``[sensor] what is the wearer doing?`` → activity description
SENSOR_PROMPT = "what is the wearer doing?"
#: ``what is the complete image? caption: <text>`` → image codes
T2I_PROMPT = "what is the complete image? caption: {}"
#: ``[image] which region does the text describe? text: <phrase>`` → four location tokens (visual grounding)
GROUNDING_PROMPT = "which region does the text describe? text: {}"


def t2i_prompt(caption: str) -> str:
    """The text-to-image instruction for one caption."""
    return T2I_PROMPT.format(caption.strip())
