"""A task registered outside the library (a toy "reverse the words" text task, in this file only) trains 3 steps
with Lightning, is checkpointed, rebuilt by zoo-eval's loader through the task registry and the checkpoint metadata
(its own state included), and exported to a model folder that ``zoo.load`` reads: no library change."""
import random
from pathlib import Path
from typing import Any

import lightning as L
import torch
from torch.utils.data import Dataset

import zoo
from tasks.base import Seq2SeqTask
from tasks.checkpoint import CheckpointMeta, bundle_from_checkpoint, read_checkpoint
from tasks.cli.evaluate import load_for_eval
from tasks.data.collate import Seq2SeqCollator
from tasks.data_module import TextDataModule
from tasks.registry import get_task, list_tasks, register_task

WORDS = ["red", "blue", "green", "circle", "square", "cross", "small", "big"]
PROMPT = "reverse the words:"


def reverse(text: str) -> str:
    return " ".join(reversed(text.split()))


def sentences(n: int, seed: int) -> list[str]:
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(2, 4))) for _ in range(n)]


# --- the toy task --------------------------------------------------------------------------------------------------
class ReverseSet(Dataset):
    def __init__(self, dm: "ReverseData", split: str):
        self.dm, self.split, self.texts = dm, split, dm.texts[split]

    def __len__(self) -> int:
        return len(self.texts)

    def __getitem__(self, i: int) -> dict[str, Any]:
        prompt, target = self.dm.encode_text([f"{PROMPT} {self.texts[i]}", reverse(self.texts[i])], 32)
        item = {"prompt": prompt, "id": i}
        if self.split == "train":
            item["target"] = target
        return item


class ReverseData(TextDataModule):
    """Random word sequences; the target is the words in reverse order."""

    def __init__(self, root: str, n_train: int = 64, n_val: int = 8, batch_size: int = 8):
        super().__init__()
        self.root, self.vocab_size, self.num_workers, self.collate = Path(root), 300, 0, Seq2SeqCollator()
        self.batch_size = self.eval_batch_size = batch_size
        self.texts = {"train": sentences(n_train, 0), "val": sentences(n_val, 1)}

    def training_texts(self) -> list[str]:
        return [PROMPT, *self.texts["train"]]

    def bind(self, model_cfg: Any, layout: Any, tokenizer: Any = None) -> None:
        self.attach(layout, tokenizer)
        self.load_tokenizer()

    def references(self, stage: str) -> dict[int, str]:
        return {i: reverse(t) for i, t in enumerate(self.texts[stage])}

    def train_dataloader(self) -> Any:
        return self._loader(ReverseSet(self, "train"), self.batch_size, shuffle=True)

    def val_dataloader(self) -> Any:
        return self._loader(ReverseSet(self, "val"), self.eval_batch_size, shuffle=False)


class ReverseTask(Seq2SeqTask):
    """Text → its words reversed; scored by exact match. Keeps the words it was trained on (its checkpoint state)."""

    name = "toy_reverse"
    monitor_metric = "exact"

    def __init__(self, *args: Any, **kwargs: Any):
        super().__init__(*args, **kwargs)
        self.words: list[str] = []

    def setup(self, stage: str) -> None:
        if self.datamodule is not None:
            self.words = sorted({w for t in self.datamodule.texts["train"] for w in t.split()})

    def model_inputs(self, batch: dict[str, Any]) -> dict[str, Any]:
        return {"text": (batch["prompt_ids"], batch["prompt_mask"])}

    def compute_metrics(self, stage: str, predictions: dict[Any, str]) -> dict[str, float]:
        refs = self.scored_references(stage, self.datamodule.references(stage), predictions)
        return {"exact": sum(predictions[k].strip() == refs[k] for k in refs) / max(1, len(refs))}

    def checkpoint_state(self) -> dict[str, Any]:
        return {**super().checkpoint_state(), "words": list(self.words)}

    def load_checkpoint_state(self, state: dict[str, Any]) -> None:
        self.words = list(state.get("words") or [])


register_task("toy_reverse", f"{__name__}:ReverseTask", f"{__name__}:ReverseData", data_config="toy_reverse")


# --- the test ------------------------------------------------------------------------------------------------------
def test_a_task_registered_outside_the_library_trains_checkpoints_and_reloads(tmp_path):
    assert "toy_reverse" in list_tasks() and get_task("toy_reverse").task_class() is ReverseTask
    dm = ReverseData(str(tmp_path / "data"))
    tok = dm.load_tokenizer()
    torch.manual_seed(0)
    model = zoo.create_model("test-tiny", vocab={"text_size": tok.vocab_size, "image_code_size": 16, "loc_bins": 4})
    dm.bind(model.cfg, model.layout)
    task = ReverseTask(model, tok, lr=5e-3, warmup_steps=1, max_new_tokens=8, label_smoothing=0.0)
    fixed = Seq2SeqCollator()([ReverseSet(dm, "train")[i] for i in range(16)])
    with torch.no_grad():
        before = task.loss(fixed).item()

    trainer = L.Trainer(accelerator="cpu", max_steps=3, logger=False, enable_checkpointing=False,
                        enable_progress_bar=False, enable_model_summary=False, num_sanity_val_steps=0,
                        limit_val_batches=1)
    trainer.fit(task, datamodule=dm)
    assert trainer.global_step == 3
    with torch.no_grad():
        after = task.loss(fixed).item()
    assert after < before, (before, after)  # 3 steps of training moved the model toward the targets
    trainer.validate(task, datamodule=dm, verbose=False)
    assert 0.0 <= task.final_metrics["val/exact"] <= 1.0 and len(task.predictions["val"]) == 8

    path = tmp_path / "toy.ckpt"
    trainer.save_checkpoint(path)
    meta = CheckpointMeta.read(read_checkpoint(path), str(path))
    assert meta.task == "toy_reverse" and meta.state == {"words": sorted(WORDS)}

    # zoo-eval's loader: the task class comes from the registry by the checkpoint's task name
    model2, tok2, name, settings = load_for_eval(str(path))
    assert name == "toy_reverse" and settings["max_new_tokens"] == 8 and tok2.to_str() == tok.to_str()
    task2 = ReverseTask(model2, tok2, **ReverseTask.eval_kwargs(settings, {"num_beams": None}))
    task2.on_load_checkpoint(torch.load(path, map_location="cpu", weights_only=True))
    assert task2.words == sorted(WORDS)
    task.eval()
    batch = Seq2SeqCollator()([ReverseSet(dm, "val")[i] for i in range(4)])
    assert torch.equal(task2.generate_tokens(batch), task.generate_tokens(batch))

    # zoo-export: a model folder that zoo.load reads, with the task's generation settings
    folder = bundle_from_checkpoint(read_checkpoint(path), str(path)).save_pretrained(tmp_path / "model")
    loaded = zoo.load(folder)
    assert loaded.tasks["toy_reverse"]["max_new_tokens"] == 8
    inputs = task.model_inputs(batch)
    with torch.no_grad():
        want = task.model(inputs, fixed["tgt_in"][:4])
        got = loaded.model(inputs, fixed["tgt_in"][:4])
    torch.testing.assert_close(got, want)
