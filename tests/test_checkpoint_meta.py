"""The checkpoint's ``mmzoo`` metadata: one definition (``tasks.checkpoint.CheckpointMeta``), written by the task
base class with each task's ``checkpoint_state`` hook and read back by zoo-eval / zoo-export in the layout older
checkpoints have."""
import pytest
import torch

import zoo
from modalities.text import TextTokenizer
from tasks.checkpoint import CheckpointMeta, bundle_from_checkpoint, renderer_for, vq_folder_for

TEXTS = ["a small red circle", "a blue square left of a green cross", "what colour is the square?", "yes", "no"] * 20


@pytest.fixture(scope="module")
def parts():
    tok = TextTokenizer.train(TEXTS, vocab_size=300)
    torch.manual_seed(0)
    model = zoo.create_model("test-tiny", vocab={"text_size": tok.vocab_size, "image_code_size": 16, "loc_bins": 4})
    return model.eval(), tok


def _checkpoint(task) -> dict:
    """What Lightning saves, reduced to the parts mmzoo reads: the state dict, hyper-parameters and the hooks' output."""
    ckpt = {"state_dict": {f"model.{k}": v for k, v in task.model.state_dict().items()},
            "hyper_parameters": dict(task.hparams)}
    task.on_save_checkpoint(ckpt)
    return ckpt


def test_a_vqa_checkpoint_keeps_the_layout_and_its_state_round_trips(parts):
    from tasks.vqa import VQATask

    model, tok = parts
    task = VQATask(model, tok, decoding="trie", candidates=["yes", "no"])
    task.finetune_info = {"pretrained": "somewhere", "mode": "full", "tasks": {}}
    ckpt = _checkpoint(task)
    # the flat layout every earlier checkpoint has (zoo-eval / zoo-export of old runs read the same keys)
    assert set(ckpt["mmzoo"]) == {"task", "model_config", "tokenizer", "candidates"}
    assert ckpt["mmzoo"]["task"] == "vqa" and ckpt["mmzoo"]["candidates"] == ["yes", "no"]
    assert ckpt["mmzoo"]["model_config"] == model.cfg.to_dict() and ckpt["mmzoo"]["tokenizer"] == tok.to_str()
    assert ckpt["mmzoo_finetune"] == {"pretrained": "somewhere", "mode": "full", "tasks": {}}
    meta = CheckpointMeta.read(ckpt, "x.ckpt")
    assert meta.task == "vqa" and meta.state == {"candidates": ["yes", "no"]} and meta.subtasks is None
    assert meta.finetune["mode"] == "full"

    fresh = VQATask(model, tok)  # resuming: the hook restores the candidates
    assert fresh.candidates is None
    fresh.on_load_checkpoint(ckpt)
    assert fresh.candidates == ["yes", "no"]

    bundle = bundle_from_checkpoint(ckpt, "x.ckpt")
    assert bundle.tasks["vqa"]["candidates"] == ["yes", "no"]
    assert bundle.tasks["vqa"]["decoding"] == "trie"
    assert vq_folder_for(ckpt, "x.ckpt") is None and renderer_for(ckpt, "x.ckpt") == (None, 48)


def test_an_older_multitask_checkpoint_reads_per_task(parts, tmp_path):
    """A multi-task checkpoint as written before CheckpointMeta (a literal): per-task state, the VQ folder."""
    model, tok = parts
    (tmp_path / "vq").mkdir()
    ckpt = {"state_dict": {f"model.{k}": v for k, v in model.state_dict().items()},
            "hyper_parameters": {"tasks": {"vqa": {"max_new_tokens": 3}, "caption": {"num_beams": 2},
                                           "text_to_image": {"top_k": 8}}},
            "mmzoo": {"task": "multitask", "model_config": model.cfg.to_dict(), "tokenizer": tok.to_str(),
                      "tasks": {"vqa": {"task": "vqa", "candidates": ["yes"]}, "caption": {"task": "caption"},
                                "text_to_image": {"task": "text_to_image", "vq_tokenizer": str(tmp_path / "vq")}}}}
    meta = CheckpointMeta.read(ckpt)
    assert meta.task == "multitask" and set(meta.subtasks) == {"vqa", "caption", "text_to_image"}
    assert meta.task_states()["vqa"]["candidates"] == ["yes"]
    assert vq_folder_for(ckpt, str(tmp_path / "run" / "x.ckpt")) == tmp_path / "vq"
    # the metadata written back is the metadata read
    again: dict = {}
    meta.write(again)
    assert again["mmzoo"] == ckpt["mmzoo"] and "mmzoo_finetune" not in again


def test_a_text_to_image_checkpoint_without_its_vq_folder_is_refused(parts):
    model, tok = parts
    ckpt = {"mmzoo": {"task": "text_to_image", "model_config": model.cfg.to_dict(), "tokenizer": tok.to_str(),
                      "vq_tokenizer": None}, "state_dict": {}}
    with pytest.raises(ValueError, match="without a VQ tokenizer path; pass vq="):
        vq_folder_for(ckpt, "t2i.ckpt")


def test_bad_metadata_is_refused_with_a_clear_error():
    with pytest.raises(ValueError, match=r"run\.ckpt: not an mmzoo checkpoint"):
        CheckpointMeta.read({"state_dict": {}}, "run.ckpt")
    with pytest.raises(ValueError, match="reserved key"):
        CheckpointMeta(task="mine", state={"tokenizer": "x"})
