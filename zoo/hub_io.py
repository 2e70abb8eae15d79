"""Hub transport: download a repo snapshot, upload a model folder, copy a folder into the local cache.

``HF_HUB_OFFLINE`` and ``HF_HUB_CACHE`` are read at call time. Every way a repo can be missing becomes a
:class:`HubLoadError` that names the repo, the revision and what to do. Knows nothing of models: ``zoo.hub``
and ``zoo.pretrained`` build on it.
"""
from __future__ import annotations

import hashlib
import os
import shutil
from pathlib import Path

from zoo.loading import PICKLE_SUFFIXES

HUB_PREFIX = "hf-hub:"
_TRUE = {"1", "true", "yes", "on"}


class HubLoadError(OSError):
    """A model could not be had from the Hub or its cache; the message says what to do."""

    def __init__(self, message: str, repo_id: str, revision: str | None):
        super().__init__(message)
        self.repo_id, self.revision = repo_id, revision


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
