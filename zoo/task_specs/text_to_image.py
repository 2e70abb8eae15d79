"""Text-to-image: ``what is the complete image? caption: <text>`` → the H×W VQ code sequence.

The code route samples image codes with classifier-free guidance against the empty caption, constrained to
the codebook's ids (:meth:`TextToImageSpec.sample`); the layout route (:data:`LAYOUT_PLAN`) plans a layout as
text with location tokens, which a renderer turns into pixels.
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Mapping

import torch

from zoo.layout_plan import LAYOUT_PROMPT
from zoo.task_specs.base import TaskSpec, register_task_spec, text_batch
from zoo.vocab import VocabLayout

#: ``what is the complete image? caption: <text>`` → image codes
T2I_PROMPT = "what is the complete image? caption: {}"
#: text-to-image sampling defaults; a model's "text_to_image" task entry overrides them
T2I_GENERATION: dict[str, Any] = {"guidance_scale": 3.0, "do_sample": True, "temperature": 1.0, "top_k": 32,
                                  "top_p": 1.0, "use_cache": True, "seed": 0}


@dataclass(frozen=True)
class TextToImageSpec(TaskSpec):
    """The code route: the outputs are image codes of the VQ tokenizer (``image_tokenizer`` below)."""

    generation: Mapping[str, Any] = field(default_factory=lambda: dict(T2I_GENERATION))

    def allowed_tokens(self, layout: VocabLayout, image_tokenizer: Any = None) -> torch.Tensor:
        """Exactly the codebook's ids (no EOS: the sequence has exactly ``h*w`` codes)."""
        if image_tokenizer is None:
            raise ValueError("text-to-image decoding needs the VQ image tokenizer")
        return image_tokenizer.allowed_mask(layout)

    def decode(self, tokens: torch.Tensor, layout: VocabLayout, tokenizer: Any) -> list[Any]:
        """Generated unified ids → raw code rows; ``tokenizer`` is the VQ image tokenizer."""
        return tokenizer.from_unified(tokens, layout).tolist()

    def uncond_inputs(self, tokenizer: Any, layout: VocabLayout, device: Any, max_len: int | None = None
                      ) -> dict[str, Any]:
        """The unconditional source of classifier-free guidance: the instruction with an empty caption (one row)."""
        ids, mask = text_batch(tokenizer.encode_batch([self.instruction("")], max_len), layout)
        return {"text": (ids.to(device), mask.to(device))}

    def sample(self, model: Any, cond: dict[str, Any], image_tokenizer: Any, layout: VocabLayout,
               settings: Mapping[str, Any], generator: torch.Generator | None, uncond: Any = None,
               allowed: torch.Tensor | None = None) -> torch.Tensor:
        """Unified code ids ``[B, h*w]`` sampled for ``cond`` with ``settings`` (:data:`T2I_GENERATION` keys;
        ``seed`` is the caller's, through ``generator``); ``uncond`` (a segment dict, or a callable that builds
        it) is read only when ``guidance_scale`` is not 1."""
        from zoo.guidance import guided_sample

        hp = {k: v for k, v in settings.items() if k != "seed"}
        scale = float(hp.pop("guidance_scale"))
        if scale != 1.0 and callable(uncond):
            uncond = uncond()
        allowed = self.allowed_tokens(layout, image_tokenizer) if allowed is None else allowed
        return guided_sample(model, cond, image_tokenizer.num_tokens, uncond=uncond if scale != 1.0 else None,
                             guidance_scale=scale, allowed=allowed, generator=generator, **hp)


TEXT_TO_IMAGE = register_task_spec(TextToImageSpec(
    "text_to_image", method="generate_image", prompt=T2I_PROMPT,
    card_example="bundle.generate_image(['a red circle'], seed=0)[0].save('red_circle.png')"))


def t2i_prompt(caption: str) -> str:
    """The text-to-image instruction for one caption."""
    return TEXT_TO_IMAGE.instruction(caption)

#: the layout route's planner (same task name, ``task.decoder=layout``): caption → layout words and location
#: tokens, decoded greedily (:func:`zoo.layout_plan.parse_layout` reads the plan back)
LAYOUT_PLAN = TaskSpec("text_to_image", method="plan_layout", prompt=LAYOUT_PROMPT, vocab=("text", "loc_bins"))
