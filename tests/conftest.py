import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


@pytest.fixture(scope="session")
def tiny_shapes(tmp_path_factory) -> Path:
    """A small Shapes dataset shared by the tests."""
    from tasks.data.shapes import ShapesConfig, ensure_shapes

    root = tmp_path_factory.mktemp("data") / "shapes"
    ensure_shapes(root, ShapesConfig(n_train=64, n_val=16, n_test=16))
    return root


def compose(overrides: list[str], tmp_path: Path):
    """Compose the real train.yaml with test overrides, the way zoo-train would."""
    from hydra import compose as hcompose, initialize_config_module
    from hydra.core.global_hydra import GlobalHydra

    from tasks.resolvers import register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="configs", version_base="1.3"):
        return hcompose(config_name="train", overrides=[
            f"paths.output_dir={tmp_path}", f"paths.log_dir={tmp_path}/logs", *overrides])
