"""One-call loading: ``zoo.load(source)`` for a registered tag, a local folder or ``hf-hub:org/name[@rev]``.

Hub access goes through ``huggingface_hub`` and its local cache; ``HF_HUB_OFFLINE`` and ``HF_HUB_CACHE``
are read at call time. Every way a repo can be missing becomes a :class:`HubLoadError` that names the repo,
the revision and what to do.
"""
from __future__ import annotations

import fnmatch
import hashlib
import os
import shutil
from dataclasses import dataclass
from pathlib import Path

from zoo.pretrained import PICKLE_SUFFIXES, Pretrained

HUB_PREFIX = "hf-hub:"
_TRUE = {"1", "true", "yes", "on"}


class HubLoadError(OSError):
    """A model could not be had from the Hub or its cache; the message says what to do."""

    def __init__(self, message: str, repo_id: str, revision: str | None):
        super().__init__(message)
        self.repo_id, self.revision = repo_id, revision


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
# Hub access
# ------------------------------------------------------------------------------------------------
def hub_offline() -> bool:
    """``HF_HUB_OFFLINE`` as set now (huggingface_hub itself reads it only at import)."""
    from huggingface_hub import constants

    return os.environ.get("HF_HUB_OFFLINE", "").strip().lower() in _TRUE or bool(constants.HF_HUB_OFFLINE)


def hub_cache_dir() -> str:
    """The Hub cache in use now (``HF_HUB_CACHE``, else ``HF_HOME/hub``, else huggingface_hub's default)."""
    from huggingface_hub import constants

    if os.environ.get("HF_HUB_CACHE"):
        return os.environ["HF_HUB_CACHE"]
    if os.environ.get("HF_HOME"):
        return os.path.join(os.environ["HF_HOME"], "hub")
    return constants.HF_HUB_CACHE


def parse_hub_source(source: str) -> tuple[str, str | None]:
    """``hf-hub:org/name[@revision]`` → ``(repo_id, revision)``."""
    spec = source[len(HUB_PREFIX):] if source.startswith(HUB_PREFIX) else source
    repo_id, _, revision = spec.partition("@")
    if repo_id.count("/") != 1 or not all(repo_id.split("/")):
        raise ValueError(f"{source!r}: expected hf-hub:org/name[@revision]")
    return repo_id, revision or None


def _what_to_do(repo_id: str, revision: str | None, offline: bool, cache: str) -> str:
    rev = revision or "main"
    steps = [f"download it on a machine with network access (`hf download {repo_id} --revision {rev}`) and copy "
             f"the cache folder models--{repo_id.replace('/', '--')} into {cache}"]
    if offline:
        steps.append("or unset HF_HUB_OFFLINE=1 to let it download")
    steps.append("or pass a local model folder (zoo-export writes one from a training checkpoint)")
    return "To fix: " + "; ".join(steps) + "."


def download(repo_id: str, revision: str | None = None, *, allow_pickle: bool = False,
             cache_dir: str | Path | None = None, token: str | None = None) -> Path:
    """The local snapshot folder of a Hub repo (from the cache when offline). Pickle files are not fetched
    unless ``allow_pickle``."""
    from huggingface_hub import snapshot_download
    from huggingface_hub.errors import (GatedRepoError, HfHubHTTPError, LocalEntryNotFoundError,
                                        RepositoryNotFoundError, RevisionNotFoundError)

    offline = hub_offline()
    cache = str(cache_dir or hub_cache_dir())
    patterns = ["*.json", "*.safetensors", "*.md", "*.txt", "*.model"]
    if allow_pickle:
        patterns += [f"*{s}" for s in PICKLE_SUFFIXES]
    where = f"{repo_id!r} (revision {revision or 'main'!r})"
    try:
        path = snapshot_download(repo_id, revision=revision, cache_dir=cache, local_files_only=offline,
                                 allow_patterns=patterns, token=token)
    except RevisionNotFoundError as e:
        raise HubLoadError(f"Hub repo {repo_id!r} has no revision {revision!r}. Use an existing branch, tag or "
                           f"commit (hf-hub:{repo_id}@<revision>), or drop '@' for main.", repo_id, revision) from e
    except GatedRepoError as e:
        raise HubLoadError(f"{where} is gated: accept its terms on the Hub and log in (`hf auth login`) or set "
                           "HF_TOKEN.", repo_id, revision) from e
    except RepositoryNotFoundError as e:
        raise HubLoadError(f"{where} does not exist on the Hub or is private. Check the repo id, or log in "
                           f"(`hf auth login`) if it is private. {_what_to_do(repo_id, revision, offline, cache)}",
                           repo_id, revision) from e
    except LocalEntryNotFoundError as e:
        why = ("HF_HUB_OFFLINE=1 is set and it is not in the local Hub cache " if offline
               else "the Hub could not be reached and it is not in the local Hub cache ")
        raise HubLoadError(f"cannot load {where}: {why}({cache}). {_what_to_do(repo_id, revision, offline, cache)}",
                           repo_id, revision) from e
    except (HfHubHTTPError, OSError) as e:
        raise HubLoadError(f"cannot load {where}: {type(e).__name__}: {e}. "
                           f"{_what_to_do(repo_id, revision, offline, cache)}", repo_id, revision) from e
    return Path(path)


def upload_folder(folder: str | Path, repo_id: str, *, private: bool | None = None, revision: str | None = None,
                  commit_message: str | None = None, token: str | None = None) -> str:
    """Create the model repo if needed and upload a saved model folder; returns the commit URL."""
    from huggingface_hub import HfApi

    api = HfApi(token=token)
    api.create_repo(repo_id, repo_type="model", private=private, exist_ok=True)
    info = api.upload_folder(folder_path=str(folder), repo_id=repo_id, repo_type="model", revision=revision,
                             commit_message=commit_message or "Upload mmzoo model",
                             allow_patterns=["config.json", "model.safetensors", "tokenizer.json", "README.md",
                                             "image_codes/config.json", "image_codes/*.safetensors"])
    return str(getattr(info, "commit_url", info))


def add_to_cache(folder: str | Path, repo_id: str, *, revision: str = "main",
                 cache_dir: str | Path | None = None) -> str:
    """Copy a saved model folder into a Hub cache as ``repo_id`` at branch ``revision`` (for air-gapped
    machines: what a download would have left), subfolders (``image_codes/``) included. Returns the snapshot's
    commit hash (content-derived)."""
    folder = Path(folder)
    files = sorted(p.relative_to(folder) for p in folder.rglob("*") if p.is_file())
    h = hashlib.sha1()
    for p in files:
        h.update(p.as_posix().encode())
        h.update(hashlib.sha1((folder / p).read_bytes()).digest())
    commit = h.hexdigest()
    repo = Path(cache_dir or hub_cache_dir()) / f"models--{repo_id.replace('/', '--')}"
    snap = repo / "snapshots" / commit
    snap.mkdir(parents=True, exist_ok=True)
    for p in files:
        (snap / p).parent.mkdir(parents=True, exist_ok=True)
        shutil.copy2(folder / p, snap / p)
    (repo / "refs").mkdir(exist_ok=True)
    (repo / "refs" / revision).write_text(commit)
    return commit


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
