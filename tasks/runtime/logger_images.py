"""Send a sample grid (a PNG the run wrote) to every experiment logger of the trainer, each the way it shows images.

CSV has no images (the PNG stays in the run directory). A logger type not listed here is skipped with one log line.
"""
from __future__ import annotations

import logging
from pathlib import Path
from typing import Any

log = logging.getLogger(__name__)


def _pil(path: Path):
    from PIL import Image

    with Image.open(path) as im:
        return im.convert("RGB")


def log_image(logger: Any, path: str | Path, tag: str, step: int) -> bool:
    """Log the image file ``path`` under ``tag`` at ``step`` to ``logger``; ``False`` when it takes no images."""
    import numpy as np

    path = Path(path)
    kind = type(logger).__name__
    if kind == "TensorBoardLogger":
        logger.experiment.add_image(tag, np.asarray(_pil(path)), global_step=step, dataformats="HWC")
        logger.experiment.flush()
    elif kind == "WandbLogger":
        logger.log_image(key=tag, images=[str(path)], step=step)
    elif kind == "MLFlowLogger":
        logger.experiment.log_artifact(logger.run_id, str(path), artifact_path=f"samples/step_{step}/{tag.split('/')[0]}")
    elif kind == "CometLogger":
        logger.experiment.log_image(str(path), name=tag, step=step)
    elif kind == "AimLogger":
        from aim import Image as AimImage

        logger.experiment.track(AimImage(_pil(path)), name=tag, step=step)
    else:
        return False
    return True


def log_images_to_loggers(trainer: Any, paths: list[Path], stage: str) -> None:
    """Every logger of ``trainer`` gets each grid in ``paths`` as ``<stage>/<file stem>``."""
    for logger in getattr(trainer, "loggers", []) or []:
        for path in paths:
            try:
                if not log_image(logger, path, f"{stage}/{path.stem}", trainer.global_step):
                    break
            except Exception as e:  # noqa: BLE001  an image a logger refuses must not end the run
                log.warning("could not log %s to %s: %s", path.name, type(logger).__name__, e)
