"""Task specs (zoo.task_specs) drive both sides: the Lightning task (training and evaluation) and the inference
API (``Pretrained``) read the same prompt, text ids, allowed tokens, generation defaults and output decoding."""
from __future__ import annotations

from pathlib import Path
from typing import Any

import pytest
import torch

import zoo
import zoo.generation
from modalities.text import TextTokenizer
from zoo.pretrained import Pretrained
from zoo.task_specs import TaskSpec, register_task_spec, task_spec, task_specs
from zoo.vocab import EOS_ID, PAD_ID

TEXTS = ["what does the image describe?", "what is the wearer doing?", "a red circle", "a blue square",
         "is there a circle?", "yes", "no", "two", "what colour is the square?", "blue", "red"] * 5


@pytest.fixture(scope="module")
def tok() -> TextTokenizer:
    return TextTokenizer.train(TEXTS, vocab_size=300)


@pytest.fixture(scope="module")
def model(tok):
    torch.manual_seed(0)
    return zoo.create_model("test-tiny", vocab={"text_size": tok.vocab_size, "image_code_size": 16, "loc_bins": 4},
                            max_positions=80).eval()


class Spy:
    """Stands in for ``zoo.generation.generate``: records the segments and the mask, returns fixed tokens."""

    def __init__(self, tokens: torch.Tensor):
        self.tokens, self.calls = tokens, []

    def __call__(self, model: Any, segments: dict[str, Any], **kw: Any) -> torch.Tensor:
        self.calls.append((segments, kw))
        return self.tokens[: segments["text"][0].shape[0]]


def rows_of(ids: torch.Tensor, mask: torch.Tensor) -> list[list[int]]:
    return [r[m].tolist() for r, m in zip(ids.cpu(), mask.cpu())]


def random_outputs(layout, n: int = 3, t: int = 9) -> torch.Tensor:
    """Generated-looking rows: ids from the whole vocabulary, an EOS in each row, PAD after it."""
    g = torch.Generator().manual_seed(0)
    tokens = torch.randint(0, layout.size, (n, t), generator=g)
    for i in range(n):
        tokens[i, 3 + i] = EOS_ID
        tokens[i, 4 + i:] = PAD_ID
    return tokens


def test_the_registry_names_each_task_once_and_refuses_a_second_spec_of_a_name():
    specs = task_specs()
    assert list(specs)[:4] == ["caption", "vqa", "sensor_to_text", "text_to_image"]
    assert {s.method for s in specs.values()} >= {"caption", "answer", "describe", "generate_image"}
    with pytest.raises(ValueError, match="already registered"):
        register_task_spec(TaskSpec("caption"))
    with pytest.raises(KeyError, match="no task spec 'nope'"):
        task_spec("nope")


def test_caption_training_and_inference_share_prompt_ids_allowed_tokens_and_decoding(tok, model, tmp_path,
                                                                                       monkeypatch):
    from tasks.caption import CaptionDataModule, CaptionTask

    dm = CaptionDataModule(str(tmp_path), generate=None)
    dm.attach(model.layout, tok)
    train_prompt = dm.encode_text([dm.prompt_text], dm.max_target_len)[0]
    task = CaptionTask(model, tok)

    bundle = Pretrained(model, tok, tasks={"caption": {"max_new_tokens": 5}})
    spy = Spy(random_outputs(model.layout))
    monkeypatch.setattr(zoo.generation, "generate", spy)
    captions = bundle.caption([torch.zeros(3, 32, 32)] * 2)

    segments, kw = spy.calls[0]
    assert rows_of(*segments["text"]) == [train_prompt] * 2
    assert dm.prompt_text == task_spec("caption").prompt == "what does the image describe?"
    assert torch.equal(kw["allowed"], task.allowed_tokens())
    assert kw["max_new_tokens"] == 5 and kw["num_beams"] == 1  # saved entry over the spec's defaults
    assert captions == task.decode_outputs(spy.tokens[:2])
    lo, hi = model.layout.ranges()["text"]
    first = spy.tokens[0, :3]
    assert captions[0] == tok.decode([int(t) - lo for t in first if lo <= t < hi])


def test_vqa_trie_allowed_tokens_and_question_ids_are_the_same_in_training_and_inference(tok, model, tmp_path,
                                                                                          monkeypatch):
    from tasks.vqa import VQADataModule, VQATask

    candidates = ["yes", "no", "two", "blue", "red"]
    task = VQATask(model, tok, decoding="trie", candidates=candidates)
    cand = task.candidate_tensors()
    bundle = Pretrained(model, tok, tasks={"vqa": {"decoding": "trie", "candidates": candidates}})
    trie, = bundle._gen_kwargs(task_spec("vqa"), {})["processors"]
    for name in ("keys", "child", "parent", "token"):
        assert torch.equal(getattr(trie, name), getattr(cand["trie"], name)), name
    assert cand["ids"] == [[t + model.layout.text_start for t in tok.encode(c)] for c in candidates]
    open_set = Pretrained(model, tok, tasks={"vqa": {"decoding": "open", "candidates": candidates}})
    assert "processors" not in open_set._gen_kwargs(task_spec("vqa"), {})

    dm = VQADataModule(str(tmp_path), generate=None)
    dm.attach(model.layout, tok)
    questions = ["is there a circle?", "what colour is the square?"]
    spy = Spy(random_outputs(model.layout))
    monkeypatch.setattr(zoo.generation, "generate", spy)
    answers = bundle.answer([torch.zeros(3, 32, 32)] * 2, questions)
    segments, kw = spy.calls[0]
    assert rows_of(*segments["text"]) == dm.encode_text(questions, 64)
    assert kw["processors"] == [trie]
    assert torch.equal(kw["allowed"], task.allowed_tokens())
    assert answers == task.decode_outputs(spy.tokens[:2])


def test_sensor_to_text_prompt_ids_and_decoding_are_the_same_in_training_and_inference(tok, tmp_path, monkeypatch):
    from tasks.sensor_to_text import SensorTextDataModule, SensorToTextTask

    channels = ["acc_x", "acc_y", "acc_z"]
    sensor = {"channels": channels, "sample_rate": 50.0, "patch_len": 10, "patch_stride": 10, "max_len": 200,
              "mean": [0.0, 0.0, 9.8], "std": [1.0, 1.0, 1.0]}
    torch.manual_seed(0)
    model = zoo.create_model("test-tiny", vocab={"text_size": tok.vocab_size, "image_code_size": 16, "loc_bins": 4},
                             modalities={"sensor": sensor}, max_positions=80).eval()
    dm = SensorTextDataModule(str(tmp_path), generate=None, channels=channels)
    dm.attach(model.layout, tok)
    task = SensorToTextTask(model, tok)
    bundle = Pretrained(model, tok, tasks={"sensor_to_text": {"max_new_tokens": 5}})
    spy = Spy(random_outputs(model.layout))
    monkeypatch.setattr(zoo.generation, "generate", spy)
    texts = bundle.describe([torch.randn(3, 100).numpy()] * 2)
    segments, kw = spy.calls[0]
    assert dm.prompt_text == task_spec("sensor_to_text").prompt == "what is the wearer doing?"
    assert rows_of(*segments["text"]) == dm.encode_text([dm.prompt_text], dm.max_target_len) * 2
    assert torch.equal(kw["allowed"], task.allowed_tokens())
    assert kw["max_new_tokens"] == 5
    assert texts == task.decode_outputs(spy.tokens[:2])


def test_text_to_image_prompts_unconditional_row_defaults_and_allowed_codes_are_shared(tok, model, tiny_vq,
                                                                                        tmp_path):
    import inspect

    from tasks.layout_t2i import LayoutTextToImageTask
    from tasks.text_to_image import T2IDataModule, TextToImageTask
    from zoo.task_specs.text_to_image import LAYOUT_PLAN, T2I_GENERATION

    spec = task_spec("text_to_image")
    dm = T2IDataModule(str(tmp_path), vq_path=str(tmp_path / "vq"), generate=None)
    dm.attach(model.layout, tok)
    task = TextToImageTask(model, tok)
    object.__setattr__(task, "image_tokenizer", tiny_vq)
    # the training prompts (and the dropped-caption row) are the spec's instruction, as generate_image reads it
    assert dm.encode_prompts(["a red circle "]) == [
        [t + model.layout.text_start for t in tok.encode("what is the complete image? caption: a red circle")]]
    uncond = task.uncond_inputs()["text"]
    assert rows_of(*uncond) == dm.encode_prompts([""])
    assert rows_of(*spec.uncond_inputs(tok, model.layout, "cpu", 80)["text"]) == dm.encode_prompts([""])
    # one set of sampling defaults: the task's constructor, its hparams and the inference API's
    params = inspect.signature(TextToImageTask.__init__).parameters
    assert {k: params[k].default for k in T2I_GENERATION} == T2I_GENERATION == dict(spec.generation)
    assert {k: task.hparams[k] for k in T2I_GENERATION} == T2I_GENERATION
    bundle = Pretrained(model, tok, tasks={"text_to_image": {"top_k": 5, "max_new_tokens": 3}})
    assert spec.generation_settings(bundle.tasks["text_to_image"], {"seed": 4, "top_p": None}) == \
        {**T2I_GENERATION, "top_k": 5, "seed": 4}
    # codes only: exactly the codebook's ids, decoded back to raw codes
    allowed = task.allowed_tokens()
    lo = model.layout.image_code_start
    assert allowed.nonzero().flatten().tolist() == list(range(lo, lo + tiny_vq.num_codes))
    codes = torch.tensor([[lo + 3, lo + 0, lo + 11]])
    assert task.decode_outputs(codes) == [[3, 0, 11]]
    # the layout route: text and location tokens, in training and in plan_layout
    layout_task = LayoutTextToImageTask(model, tok)
    assert torch.equal(layout_task.allowed_tokens(), LAYOUT_PLAN.allowed_tokens(model.layout))
    assert layout_task.allowed_tokens().sum() == model.layout.text_size + model.layout.loc_bins + 1


def test_a_spec_registered_outside_the_library_reaches_the_model_card_and_the_untrained_task_error(tok, model):
    from zoo.model_card import model_card
    from zoo.pretrained import UntrainedTaskError
    from zoo.task_specs.base import registered_specs

    spec = register_task_spec(TaskSpec("toy_count", method="count", prompt="how many? {}",
                                       card_example="print(bundle.count(['image.png']))"))
    try:
        assert task_spec("toy_count") is spec and spec.instruction(" dots ") == "how many? dots"
        card = model_card({"arch": "test-tiny", "tasks": {"toy_count": {}, "caption": {}}})
        assert card.index("bundle.caption(") < card.index("bundle.count(")  # built-ins first
        assert "generate_image" not in card
        bundle = Pretrained(model, tok, tasks={"toy_count": {}})
        with pytest.raises(UntrainedTaskError, match=r"lists the tasks \['toy_count'\]: use count\(\)"):
            bundle.caption(torch.zeros(3, 32, 32))
    finally:
        registered_specs().pop("toy_count")
    assert "toy_count" not in task_specs()


def test_the_text_tasks_generation_defaults_are_the_specs():
    import inspect

    from tasks.base import Seq2SeqTask
    from zoo.task_specs import DEFAULT_GENERATION

    params = inspect.signature(Seq2SeqTask.__init__).parameters
    assert {k: params[k].default for k in DEFAULT_GENERATION} == DEFAULT_GENERATION
    for name in ("caption", "vqa", "sensor_to_text"):
        assert dict(task_spec(name).generation) == DEFAULT_GENERATION
