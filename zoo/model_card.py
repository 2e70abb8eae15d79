"""The model card (``README.md``) of a saved model folder: what it was trained on, how to load it, its limits."""
from __future__ import annotations

from typing import Any

from zoo.task_specs import task_specs


def model_card(config: dict[str, Any], card: dict[str, Any] | None = None) -> str:
    """Markdown model card: training data, metrics, intended use, limits and the reproducing command."""
    card = dict(card or {})
    tasks = list(config.get("tasks") or {})
    metrics = card.get("metrics") or {}
    name = card.get("name") or config.get("arch", "mmzoo model")
    lines = ["---", "library_name: mmzoo", "tags:", "- mmzoo", *[f"- {t}" for t in tasks]]
    if card.get("base_model"):
        lines.append(f"base_model: {card['base_model']}")
    lines += ["---", "", f"# {name}", "",
              f"A unified encoder-decoder (`{config.get('arch')}`, d_model {config.get('d_model')}, "
              f"{config.get('enc_layers')}+{config.get('dec_layers')} layers) from mmzoo {config.get('mmzoo_version')}, "
              f"with modalities: {', '.join(['text', *config.get('modalities', {})])}.", ""]
    if card.get("num_parameters"):
        lines += [f"Parameters: {card['num_parameters'] / 1e6:.2f}M.", ""]
    lines += ["## Load", "", "```python", "import zoo", f"bundle = zoo.load({card.get('load_as', './this-folder')!r})"]
    lines += [s.card_example for n, s in task_specs().items() if n in tasks and s.card_example]
    lines += ["```", "", "## Training data", "", card.get("training_data") or "Not recorded.", ""]
    lines += ["## Metrics", ""]
    if metrics:
        lines += ["| metric | value |", "| --- | --- |", *[f"| {k} | {v:.4f} |" for k, v in sorted(metrics.items())]]
    else:
        lines.append("Not recorded.")
    lines += ["", "## Intended use", "",
              card.get("intended_use") or f"Research and demos of {', '.join(tasks) or 'its tasks'} on data like its "
              "training data; a starting point for fine-tuning with `zoo-finetune`.", "",
              "## Limits", "",
              card.get("limits") or "Trained only on the data above: expect poor results on other image domains, "
              "vocabulary and languages. Not evaluated for fairness or safety; do not use for decisions about people.",
              "", "## Reproduce", "", "```bash", card.get("command") or "# command not recorded", "```", ""]
    return "\n".join(lines)
