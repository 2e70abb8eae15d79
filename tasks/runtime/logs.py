"""One line per message: Lightning's own console handler off when Hydra's logging is set up, no adverts, timm's
"Missing keys" list summarised as a count with its reason, and no warnings about things that are not wrong."""
from __future__ import annotations

import logging
import re
import warnings

_ADVERT = re.compile(r"💡 Tip|litlogger|litmodels")
_MISSING = re.compile(r"^Missing keys \((.*)\) discovered while loading pretrained weights", re.S)


class _DropAdverts(logging.Filter):
    def filter(self, record: logging.LogRecord) -> bool:
        return not _ADVERT.search(str(record.msg))


class _SummariseMissingKeys(logging.Filter):
    """timm lists every missing key (about 1,400 characters for the stem mmzoo pretrains) in one line."""

    def filter(self, record: logging.LogRecord) -> bool:
        m = _MISSING.match(str(record.msg))
        if m:
            keys = [k.strip() for k in m.group(1).split(",") if k.strip()]
            stages = sorted({k.split(".")[0] for k in keys})
            record.msg = (f"{len(keys)} weights of {', '.join(stages)} not in the pretrained file: expected, the file "
                          "holds only the stages the model reads (e.g. mmzoo's pretrained stem); they keep their init")
            record.args = ()
        return True


def _add_once(logger: logging.Logger, flt: logging.Filter) -> None:
    if not any(type(f) is type(flt) for f in logger.filters):
        logger.addFilter(flt)


def tidy_logging() -> None:
    """Call after ``import lightning`` (it adds its own console handler at import); idempotent."""
    import lightning  # noqa: F401  (its import installs the handler removed below)

    root = logging.getLogger()
    if root.handlers:  # Hydra (or the user) configured logging: Lightning's records reach it through propagation
        for name in ("lightning", "lightning.pytorch", "lightning.fabric"):
            lg = logging.getLogger(name)
            for h in list(lg.handlers):
                if type(h) is logging.StreamHandler:
                    lg.removeHandler(h)
            lg.propagate = True
    for name in ("lightning.pytorch.utilities.rank_zero", "lightning.fabric.utilities.rank_zero"):
        _add_once(logging.getLogger(name), _DropAdverts())
    _add_once(logging.getLogger("timm.models._builder"), _SummariseMissingKeys())
    # deprecation notices inside Lightning itself, not about this project's code
    warnings.filterwarnings("ignore", message=r".*isinstance\(treespec, LeafSpec\).*")
