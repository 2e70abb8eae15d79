"""One-call loading: ``zoo.load(source)`` for a registered tag, a local folder or ``hf-hub:org/name[@rev]``.

Hub access goes through ``huggingface_hub`` and its local cache; ``HF_HUB_OFFLINE`` and ``HF_HUB_CACHE``
are read at call time. Every way a repo can be missing becomes a :class:`HubLoadError` that names the repo,
the revision and what to do. The Hub transport (download, upload, cache) is :mod:`zoo.hub_io`, re-exported here.
"""
from __future__ import annotations

import fnmatch
from dataclasses import dataclass
from pathlib import Path

from zoo.hub_io import (HUB_PREFIX, HubLoadError, add_to_cache, download, hub_cache_dir, hub_offline,  # noqa: F401
                        parse_hub_source, upload_folder)
from zoo.pretrained import Pretrained


@dataclass(frozen=True)
class PretrainedEntry:
    """A pretrained tag: where its weights live on the Hub and what they are."""

    repo_id: str
    revision: str | None = None
    description: str = ""


# Tags are ``architecture.tag``: the tag names the weights.
_PRETRAINED: dict[str, PretrainedEntry] = {}


def register_pretrained(name: str, repo_id: str, revision: str | None = None, description: str = "") -> None:
    """Register ``arch.tag`` → Hub repo (the architecture must be registered)."""
    from zoo.registry import list_models

    arch, _, tag = name.partition(".")
    if not tag:
        raise ValueError(f"pretrained names are 'architecture.tag', got {name!r}")
    if arch not in list_models():
        raise ValueError(f"{name!r}: architecture {arch!r} is not registered")
    _PRETRAINED[name] = PretrainedEntry(repo_id, revision, description)


def list_pretrained(pattern: str = "*") -> list[str]:
    """Registered pretrained ``arch.tag`` names matching a glob pattern."""
    return sorted(n for n in _PRETRAINED if fnmatch.fnmatch(n, pattern))


def pretrained_entry(name: str) -> PretrainedEntry:
    """The Hub repo (and revision) a registered ``arch.tag`` names; ``KeyError`` listing the tags otherwise."""
    if name not in _PRETRAINED:
        raise KeyError(f"unknown pretrained tag {name!r}; registered: {', '.join(list_pretrained()) or 'none'}")
    return _PRETRAINED[name]


register_pretrained("ofa-tiny.shapes", "mmzoo/ofa-tiny-shapes",
                    description="ofa-tiny captioning the embedded Shapes data (zoo-train experiment=caption_shapes)")


def _register_imported() -> None:
    from zoo.imported.florence2_archs import FLORENCE2_PRETRAINED

    for name, repo in FLORENCE2_PRETRAINED.items():
        register_pretrained(name, repo, description="Florence-2 (Microsoft, MIT licence), published weights")


_register_imported()


# ------------------------------------------------------------------------------------------------
# zoo.load
# ------------------------------------------------------------------------------------------------
def resolve(source: str | Path, *, revision: str | None = None, allow_pickle: bool = False,
            cache_dir: str | Path | None = None) -> Path:
    """The local model folder for ``source`` (downloading / reading the Hub cache as needed)."""
    from zoo.registry import list_models

    if isinstance(source, Path) or (not str(source).startswith(HUB_PREFIX) and Path(source).is_dir()):
        return Path(source)
    source = str(source)
    if source.startswith(HUB_PREFIX):
        repo_id, rev = parse_hub_source(source)
        return download(repo_id, revision or rev, allow_pickle=allow_pickle, cache_dir=cache_dir)
    if source in _PRETRAINED:
        entry = pretrained_entry(source)
        try:
            return download(entry.repo_id, revision or entry.revision, allow_pickle=allow_pickle, cache_dir=cache_dir)
        except HubLoadError as e:
            raise HubLoadError(f"pretrained {source!r} lives in Hub repo {entry.repo_id!r}: {e}",
                               e.repo_id, e.revision) from e
    if source in list_models():
        raise ValueError(f"{source!r} is an architecture, not pretrained weights: use zoo.create_model({source!r}) "
                         f"for a random init, or one of {list_pretrained(source + '.*') or list_pretrained()}")
    if any(c in source for c in "/\\") or source.startswith((".", "~")):
        raise FileNotFoundError(f"model folder {source!r} does not exist")
    raise ValueError(f"unknown model source {source!r}: use a registered pretrained tag "
                     f"({', '.join(list_pretrained()) or 'none'}), a local folder, or hf-hub:org/name[@revision]")


def load(source: str | Path, *, revision: str | None = None, allow_pickle: bool = False,
         device: str | None = None, cache_dir: str | Path | None = None) -> Pretrained:
    """Load a model and all its modality tokenizers in one call.

    ``source``: a registered ``arch.tag`` (see :func:`list_pretrained`), a local folder, or
    ``hf-hub:org/name[@revision]``. Only safetensors weights load unless ``allow_pickle=True`` (then a pickle
    weights file is read with ``torch.load(weights_only=True)``, never further). Nothing outside the folder (or
    the Hub repo's cache folder) is read and a local folder makes no network call (see :mod:`zoo.loading`).
    """
    folder = resolve(source, revision=revision, allow_pickle=allow_pickle, cache_dir=cache_dir)
    imported = _load_imported(folder, source, revision, device, cache_dir)
    if imported is not None:
        return imported
    return Pretrained.from_folder(folder, allow_pickle=allow_pickle, device=device, source=str(source))


def _load_imported(folder: Path, source: str | Path, revision: str | None, device: str | None,
                   cache_dir: str | Path | None) -> Pretrained | None:
    """Published layouts of imported architectures (Florence-2), recognised from config.json as data."""
    from zoo.imported import florence2

    if florence2.recognise(folder) is None:
        return None
    src = str(source)
    if src in _PRETRAINED:
        src = HUB_PREFIX + pretrained_entry(src).repo_id
    repo_id = parse_hub_source(src)[0] if src.startswith(HUB_PREFIX) else None
    if repo_id is not None and not any((folder / f).is_file() for f in (florence2.WEIGHTS_ST, florence2.WEIGHTS_BIN)):
        # Microsoft's repos ship pytorch_model.bin only: fetched here, read with torch.load(weights_only=True)
        from huggingface_hub import hf_hub_download

        hf_hub_download(repo_id, florence2.WEIGHTS_BIN, revision=revision, cache_dir=str(cache_dir or hub_cache_dir()),
                        local_files_only=hub_offline())
    return florence2.load_folder(folder, device=device, source=src, revision=revision)
