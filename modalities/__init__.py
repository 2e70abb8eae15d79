"""Per-modality tokenizers: CPU preprocessing, the embedding module, and save/load of their config."""
