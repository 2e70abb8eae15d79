"""mkdocs hook: publish files that live outside docs/ (benchmarks/README.md, CHANGELOG.md) as pages, unchanged."""
from pathlib import Path

from mkdocs.structure.files import File

ROOT = Path(__file__).resolve().parents[1]
EXTRA = {"benchmarks.md": ROOT / "benchmarks" / "README.md", "changelog.md": ROOT / "CHANGELOG.md"}


def on_files(files, config):
    for uri, path in EXTRA.items():
        files.append(File.generated(config, uri, content=path.read_text(encoding="utf-8")))
    return files
