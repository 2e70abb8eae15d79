"""``zoo-finetune``: fine-tune a pretrained model (weights + tokenizers) on any experiment's data.

``zoo-finetune pretrained=<arch.tag|folder|hf-hub:org/name> experiment=<exp> finetune.mode=full|frozen_encoder|lora``
composes ``configs/finetune.yaml`` (``train.yaml`` + a pretrained source) and runs ``tasks.cli.train.train``,
which calls :func:`tasks.adapters.from_pretrained` instead of building a fresh model. After training the best checkpoint
is exported to ``<run>/model`` (LoRA merged) and, for LoRA, the adapters to ``<run>/adapter``.
"""
from __future__ import annotations

from pathlib import Path

from omegaconf import DictConfig

from tasks.adapters import finetune_settings


def finetune(cfg: DictConfig) -> dict[str, float]:
    """``train(cfg)`` from ``cfg.pretrained``, then export the best checkpoint to ``<run>/model`` (LoRA
    merged) and, for LoRA, its adapters to ``<run>/adapter``."""
    from tasks.cli.train import train

    if not cfg.get("pretrained"):
        raise ValueError("zoo-finetune needs pretrained=<arch.tag | folder | hf-hub:org/name[@revision]>")
    metrics = train(cfg)
    out = Path(cfg.paths.output_dir)
    best = out / "checkpoints" / "best.ckpt"
    if cfg.finetune.get("export", True) and best.is_file():
        from tasks.cli.export import export

        lora = finetune_settings(cfg)["mode"] == "lora"
        folder = export(best, out / "model", adapter_out=out / "adapter" if lora else None)
        print(f"[mmzoo] fine-tuned model: {folder}" + (f"\n[mmzoo] LoRA adapters: {out / 'adapter'}" if lora else ""))
    return metrics


def main() -> None:
    from tasks.cli.entry import run_job, start_command

    start_command("zoo-finetune")
    import hydra

    @hydra.main(version_base="1.3", config_path="pkg://configs", config_name="finetune")
    def _main(cfg: DictConfig) -> float | None:  # defined here: Hydra names the job (and its log) after this file
        return run_job(finetune, cfg)

    _main()


if __name__ == "__main__":
    main()
