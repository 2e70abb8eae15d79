"""Florence-2's OCR / region post-processing and box quantisation (zoo/imported/florence2_post.py) against
transformers' ``Florence2Processor.post_process_generation`` (the reference, test-only) on hand-written strings."""
from __future__ import annotations

import random
import sys
from pathlib import Path

import pytest
import torch

from zoo.imported.florence2_post import (boxes_per_image, dequantize_points, draw_quads, parse_ocr, parse_regions,
                                         parse_text, quantize_box, region_prompt)

sys.path.insert(0, str(Path(__file__).parent))

transformers = pytest.importorskip("transformers")

#: image sizes (width, height): non-square both ways, tiny, not a multiple of 1000, huge
SIZES = [(640, 481), (481, 640), (1, 1), (1000, 1000), (333, 1999), (7, 3000), (4096, 37)]
Q = "<loc_10><loc_20><loc_300><loc_20><loc_300><loc_80><loc_10><loc_80>"  # one quad
EDGE = "<loc_0><loc_0><loc_999><loc_0><loc_999><loc_999><loc_0><loc_999>"  # the whole image
OCR_TEXTS = [
    "", "</s><s></s>", "no regions at all",
    f"</s><s>HELLO{Q}</s>",
    f"</s><s>CUDA{Q}FOR ENGINEERS{EDGE}An Introduction to{Q}</s><pad><pad>",  # several lines, padding
    f"<s>line with<pad> a pad{Q}</s>", f"  spaced  {EDGE}", "Ünïcode €{Q}".replace("{Q}", Q),
    f"two\nlines{Q}", f"short<loc_1><loc_2><loc_3><loc_4>then{Q}", f"twelve{Q}<loc_5><loc_6><loc_7><loc_8>",
    f"{Q}{EDGE}", f"<ocr>tagged</ocr>{Q}", f"dangling{Q}tail without locs",
]
REGION_TEXTS = [
    "", "</s><s></s>", "<loc_1><loc_2><loc_3><loc_4>", "</s><s><loc_0><loc_0><loc_999><loc_999></s>",
    "<loc_1><loc_2><loc_3><loc_4><loc_5><loc_6><loc_7><loc_8><loc_9><loc_10>",  # 10 locs: 2 boxes
    "cat<loc_100><loc_200><loc_300><loc_400>dog<loc_5><loc_6><loc_7><loc_8></s><pad>",  # text between runs
    "<loc_1><loc_2><loc_3>", "<loc_1><pad><loc_2><loc_3><loc_4><loc_5>",
]
TEXTS = ["", "   ", "</s><s>a cat</s>", "<s>car<loc_52><loc_332><loc_932><loc_774></s>", "  two\nlines  ",
         "<pad>kept<pad>", "<s>  Ünïcode €  </s>"]


@pytest.fixture(scope="module")
def processor(tmp_path_factory):
    """transformers' Florence2Processor with a tiny tokenizer (no model); its post-processing as published:
    default OCR pattern, no area threshold."""
    from florence2_reference import build_tokenizer

    from zoo.imported.florence2 import BANNED_GROUNDING

    tok = build_tokenizer(tmp_path_factory.mktemp("f2post") / "tokenizer.json")
    image = transformers.CLIPImageProcessor(size={"height": 64, "width": 64}, do_center_crop=False,
                                            crop_size={"height": 64, "width": 64}, image_seq_length=5)
    post = {"pure_text": {}, "ocr": {}, "bboxes": {}, "description_with_bboxes": {},
            "phrase_grounding": {"banned_grounding_tokens": sorted(BANNED_GROUNDING)}}
    return transformers.Florence2Processor(image_processor=image, tokenizer=tok, post_processor_config=post)


def _theirs(processor, text, task, size):
    return processor.post_process_generation(text, task=task, image_size=size)[task]


@pytest.mark.parametrize("size", SIZES)
def test_parse_ocr_equals_processor(processor, size):
    for text in OCR_TEXTS:
        assert parse_ocr(text, *size) == _theirs(processor, text, "<OCR_WITH_REGION>", size), text


def test_parse_ocr_hand_computed():
    got = parse_ocr(f"</s><s>HELLO{Q}WORLD{EDGE}</s>", 640, 480)
    # bin b → (b + 0.5) * side / 1000, truncated: x 10 → 6, 300 → 192; y 20 → 9, 80 → 38; 999 → 639 / 479
    assert got == {"quad_boxes": [[6, 9, 192, 9, 192, 38, 6, 38], [0, 0, 639, 0, 639, 479, 0, 479]],
                   "labels": ["HELLO", "WORLD"]}
    assert parse_ocr("", 10, 10) == {"quad_boxes": [], "labels": []}


@pytest.mark.parametrize("size", SIZES)
def test_parse_regions_equals_processor(processor, size):
    for text in REGION_TEXTS:
        assert parse_regions(text, *size) == _theirs(processor, text, "<REGION_PROPOSAL>", size), text
    assert parse_regions(REGION_TEXTS[4], 1000, 1000) == {"bboxes": [[1, 2, 3, 4], [5, 6, 7, 8]], "labels": ["", ""]}


@pytest.mark.parametrize("task", ["<OCR>", "<REGION_TO_CATEGORY>", "<REGION_TO_DESCRIPTION>"])
def test_parse_text_equals_processor(processor, task):
    for text in TEXTS:
        assert parse_text(text) == _theirs(processor, text, task, (64, 48)), text
    assert parse_text("<s>car<loc_1><loc_2><loc_3><loc_4></s>") == "car<loc_1><loc_2><loc_3><loc_4>"


def test_random_strings_parse_like_processor(processor):
    """200 random mixes of text, location tokens, specials and newlines, for each parser."""
    rng = random.Random(0)
    pool = ["abc", " ", "Zé", "\n", "<s>", "</s>", "<pad>", "<ocr>", "<", ">"] + [f"<loc_{i}>" for i in
                                                                                  (0, 1, 499, 500, 998, 999)] * 4
    for _ in range(200):
        text = "".join(rng.choice(pool) for _ in range(rng.randint(0, 40)))
        size = rng.choice(SIZES)
        assert parse_ocr(text, *size) == _theirs(processor, text, "<OCR_WITH_REGION>", size), text
        assert parse_regions(text, *size) == _theirs(processor, text, "<REGION_PROPOSAL>", size), text
        assert parse_text(text) == _theirs(processor, text, "<OCR>", size), text


def test_quantize_box_equals_processor(processor):
    rng = random.Random(1)
    for w, h in SIZES:
        boxes = [[0, 0, w, h], [0, 0, 0, 0], [w - 0.5, h - 0.5, w, h], [w / 2, h / 3, w * 0.75, h * 0.9],
                 [-5, -5, w + 5, h + 5]]  # edges, outside the image (clamped)
        boxes += [sorted([rng.uniform(0, w), rng.uniform(0, w)]) for _ in range(20)]
        boxes[5:] = [[a, rng.uniform(0, h / 2), b, rng.uniform(h / 2, h)] for a, b in boxes[5:]]
        for box in boxes:
            box = [box[0], box[1], box[2], box[3]]
            want = processor.post_processor.quantize(torch.tensor([box]), (w, h))[0].tolist()
            assert quantize_box(box, w, h) == want, (box, w, h)
            if all(isinstance(v, int) for v in box):  # integer pixels as an int64 tensor, as a user would
                assert quantize_box(box, w, h) == \
                    processor.post_processor.quantize(torch.tensor([box], dtype=torch.int64), (w, h))[0].tolist()
    assert quantize_box([64, 96, 192, 192], 640, 480) == [100, 200, 300, 400]  # hand-computed
    assert quantize_box([0, 0, 640, 480], 640, 480) == [0, 0, 999, 999]  # the far edge falls in the last bin
    # where a bin is at least a pixel wide, its (truncated) centre comes back into the same bin
    for b in (0, 1, 500, 999):
        x, y = dequantize_points([b, b], 1000, 2500)
        assert quantize_box([x, y, x, y], 1000, 2500) == [b] * 4


def test_region_prompt_and_boxes_per_image():
    assert region_prompt("<REGION_TO_CATEGORY>", [64, 96, 192, 192], 640, 480) == \
        "<REGION_TO_CATEGORY><loc_100><loc_200><loc_300><loc_400>"
    assert boxes_per_image([1, 2, 3, 4], 3) == [[1, 2, 3, 4]] * 3
    assert boxes_per_image([[1, 2, 3, 4], (0, 0, 5, 5)], 2) == [[1, 2, 3, 4], (0, 0, 5, 5)]
    assert boxes_per_image(torch.tensor([1.0, 2, 3, 4]), 1)[0].tolist() == [1, 2, 3, 4]
    import numpy as np

    assert quantize_box(np.array([64, 96, 192, 192]), 640, 480) == [100, 200, 300, 400]
    assert len(boxes_per_image(np.array([[1, 2, 3, 4], [0, 0, 1, 1]]), 2)) == 2
    with pytest.raises(ValueError, match="2 image"):
        boxes_per_image([[1, 2, 3, 4]] * 3, 2)
    for bad in ([1, 2, 3], [1, 2, float("nan"), 4], ["a", 2, 3, 4], [5, 0, 1, 1], [[1, 2, 3]], "1234", None,
                [True, 0, 1, 1]):
        with pytest.raises(ValueError, match="box"):
            boxes_per_image(bad, 1)
    with pytest.raises(ValueError, match="x0 > x1"):
        quantize_box([10, 0, 5, 5], 100, 100)


def test_draw_quads():
    import numpy as np
    from PIL import Image

    img = Image.new("RGB", (100, 60), "black")
    out = draw_quads(img, {"quad_boxes": [[10, 10, 90, 10, 90, 50, 10, 50]], "labels": ["hi"]})
    arr = np.asarray(out)
    assert out.size == img.size and (arr[10, 20:80] == [255, 0, 0]).all()  # the top edge, in red
    assert (np.asarray(img) == 0).all()  # drawn on a copy
