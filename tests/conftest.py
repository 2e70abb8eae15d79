import os
from pathlib import Path

import pytest

os.environ.setdefault("HF_HUB_OFFLINE", "1")
CONFIG_DIR = Path(__file__).resolve().parents[1] / "configs"
EXPERIMENTS = sorted(p.stem for p in (CONFIG_DIR / "experiment").glob("*.yaml"))


@pytest.fixture(scope="module")
def one_thread():
    """Micro models: thread hand-offs cost more than they save on a shared 2-core machine."""
    import torch

    n = torch.get_num_threads()
    torch.set_num_threads(1)
    yield
    torch.set_num_threads(n)


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

    from tasks.runtime.resolvers import register_resolvers

    register_resolvers()
    GlobalHydra.instance().clear()
    with initialize_config_module(config_module="configs", version_base="1.3"):
        return hcompose(config_name="train", overrides=[
            f"paths.output_dir={tmp_path}", f"paths.log_dir={tmp_path}/logs", *overrides])


#: A micro VQ tokenizer config: 64 px images → 8×8 grids over 16 codes.
TINY_VQ = dict(channels=[8, 8, 8, 8], num_codes=16, latent_channels=4, norm_num_groups=4)
T2I_CAPTIONS = ["a small red circle", "a large blue square to the left of a green cross",
                "a yellow triangle above a purple diamond"]


@pytest.fixture(scope="session")
def tiny_vq():
    """A randomly initialised :data:`TINY_VQ` image-code tokenizer (read-only in tests)."""
    import torch

    from modalities.image_codes import ImageCodeTokenizer, VQConfig

    torch.manual_seed(0)
    return ImageCodeTokenizer.from_config(VQConfig(**TINY_VQ)).eval()


@pytest.fixture(scope="session")
def t2i_export(tmp_path_factory, tiny_vq):
    """An in-memory text-to-image task (test-tiny + :func:`tiny_vq`), its Lightning-style checkpoint
    ``<run>/checkpoints/last.ckpt`` and the ``zoo-export`` folder of that checkpoint: ``(folder, task)``."""
    import torch

    import zoo
    from modalities.text import TextTokenizer
    from tasks.cli.export import main as export_main
    from tasks.text_to_image import TextToImageTask
    from zoo.instructions import t2i_prompt

    root = tmp_path_factory.mktemp("t2i")
    vq_dir = tiny_vq.save_pretrained(root / "vq")
    tok = TextTokenizer.train([t2i_prompt(c) for c in T2I_CAPTIONS] * 10, vocab_size=300)
    torch.manual_seed(0)
    model = zoo.create_model("test-tiny", max_positions=80,
                             vocab={"text_size": tok.vocab_size, "image_code_size": tiny_vq.num_codes})
    with torch.no_grad():  # spread the logits: guidance and seeds then visibly change the codes
        model.embed_tokens.weight.normal_(0, 1.0)
    task = TextToImageTask(model.eval(), tok, guidance_scale=2.5, top_k=6, seed=7)
    object.__setattr__(task, "image_tokenizer", tiny_vq)  # what setup() does with the datamodule's VQ
    task.vq_path = str(vq_dir)
    ckpt = {"state_dict": task.state_dict(), "hyper_parameters": dict(task.hparams), "epoch": 0, "global_step": 0}
    task.on_save_checkpoint(ckpt)
    (root / "run" / "checkpoints").mkdir(parents=True)
    torch.save(ckpt, root / "run" / "checkpoints" / "last.ckpt")
    export_main([f"ckpt={root / 'run' / 'checkpoints' / 'last.ckpt'}", f"out={root / 'export'}"])
    return root / "export", task
