"""Florence-2 bundles for training: a random model of a registered architecture to start from, the bundle of a
trained checkpoint, and the location-token initialisation of a model trained from scratch (no Lightning import:
``tasks.checkpoint`` and ``zoo-export`` use it)."""
from __future__ import annotations

from typing import Any

import torch

from zoo.imported.florence2 import FlorenceTokenizer, swap01

#: the decoding every Florence-2 checkpoint uses unless its generation_config.json says otherwise (unified ids)
BASE_GENERATION: dict[str, Any] = {"decoder_start_id": swap01(2), "eos_id": swap01(2), "pad_id": swap01(1)}


def init_location_embeddings(model: Any, tokenizer: FlorenceTokenizer, shortest_period: float = 16.0) -> int:
    """Give the ``<loc_0>`` .. ``<loc_999>`` rows of a *randomly initialised* model's token embedding (its tied output
    projection) sinusoids of the bin index (periods from ``shortest_period`` to 4000 bins), at the embedding's own
    scale: neighbouring bins start similar, so what is learned about one bin carries to its neighbours (a model
    trained from scratch learns boxes in a fraction of the steps). Returns the rows set; a pretrained Florence-2
    has learned its own and must not get these."""
    ids = [tokenizer.token_id(f"<loc_{i}>") for i in range(1000)]
    if any(i is None for i in ids):
        return 0
    weight = model.embed_tokens.weight
    d = weight.shape[1]
    bins = torch.arange(1000, dtype=torch.float64)[:, None]
    periods = torch.logspace(torch.log10(torch.tensor(4000.0)), torch.log10(torch.tensor(shortest_period)), d // 2,
                             dtype=torch.float64)
    angles = 2 * torch.pi * bins / periods[None, :]  # [1000, d/2]
    rows = torch.zeros(1000, d, dtype=torch.float64)
    rows[:, 0:2 * (d // 2):2], rows[:, 1:2 * (d // 2):2] = angles.sin(), angles.cos()
    with torch.no_grad():  # RMS 1/sqrt(2) per entry → the embedding's std
        weight[torch.tensor(ids)] = (rows * (2 ** 0.5) * weight.std().double()).to(weight.dtype)
    return len(ids)


def new_florence2(arch: str, tokenizer: FlorenceTokenizer, init_locations: bool = True, **overrides: Any) -> Any:
    """A randomly initialised Florence-2 of a registered architecture (``florence2-small``, ``test-florence2``, ...)
    around ``tokenizer`` (the text range sized to it), as a :class:`zoo.imported.florence2.Florence2` bundle: its
    ``save_pretrained`` folder is a starting point ``zoo-finetune pretrained=<folder>`` loads offline
    (``init_locations``: :func:`init_location_embeddings`)."""
    import zoo
    from zoo.imported.florence2 import Florence2

    model = zoo.create_model(arch, vocab={"text_size": tokenizer.vocab_size - 4}, **overrides).eval()
    if init_locations:
        init_location_embeddings(model, tokenizer)
    meta = {"layout": "transformers", "source": f"{arch} (random weights)", "revision": None, "license": None}
    return Florence2(model=model, tokenizer=tokenizer, source=meta["source"], generation=dict(BASE_GENERATION),
                     meta=meta)


def florence2_bundle(model: Any, tokenizer_json: str, state: dict[str, Any], source: str) -> Any:
    """The :class:`zoo.imported.florence2.Florence2` bundle of a trained model (zoo-export writes it as a folder
    ``zoo.load`` reads back)."""
    from tokenizers import Tokenizer

    from zoo.imported.florence2 import Florence2

    info = state.get("florence2") or {}
    meta = dict(info.get("meta") or {"layout": "transformers", "source": None, "revision": None, "license": None})
    return Florence2(model=model.eval(), tokenizer=FlorenceTokenizer(Tokenizer.from_str(tokenizer_json)),
                     source=source, generation={**BASE_GENERATION, **(info.get("generation") or {})}, meta=meta)
