"""Text-to-image's layout route: the layout text format, the renderer, the planner's scores, saving and loading."""
import json

import pytest
import torch

from zoo.layout_plan import layout_prompt, layout_target, parse_layout, quantize_box
from zoo.layout_renderer import Layout, LayoutRenderer, LayoutRendererConfig
from zoo.vocab import EOS_ID, VocabLayout

pytestmark = pytest.mark.usefixtures("one_thread")

SCENE = Layout("dark", [{"box": (0.1, 0.2, 0.3, 0.4), "size": "small", "colour": "red", "shape": "triangle"},
                        {"box": (0.5, 0.1, 0.9, 0.5), "size": "large", "colour": "blue", "shape": "circle"}])


@pytest.fixture(scope="module")
def text_tok():
    from modalities.text import TextTokenizer

    texts = [layout_prompt("a small red triangle left of a large blue circle"), "light dark small large",
             "red green blue yellow purple orange circle square triangle diamond cross"] * 20
    return TextTokenizer.train(texts, vocab_size=300)


def test_layout_text_round_trip(text_tok):
    vocab = VocabLayout(text_size=text_tok.vocab_size, loc_bins=100)
    ids = layout_target(SCENE, vocab, text_tok)
    locs = [t for t in ids if t >= vocab.loc_start]
    assert len(locs) == 8  # four location tokens per object
    lay, dropped = parse_layout(ids + [EOS_ID, vocab.loc_start + 5], vocab, text_tok, LayoutRendererConfig())
    assert dropped == 0 and lay.tone == "dark"
    assert [(o["size"], o["colour"], o["shape"]) for o in lay.objects] == [("small", "red", "triangle"),
                                                                          ("large", "blue", "circle")]
    for got, want in zip(lay.objects, SCENE.objects):
        assert got["box"] == pytest.approx(quantize_box(want["box"], 100))
        assert got["box"] == pytest.approx(want["box"], abs=0.51 / 99)  # half a bin


def test_malformed_entries_are_dropped(text_tok):
    vocab = VocabLayout(text_size=text_tok.vocab_size, loc_bins=100)
    ids = layout_target(SCENE, vocab, text_tok)
    first_loc = next(i for i, t in enumerate(ids) if t >= vocab.loc_start)
    assert first_loc > 1 and all(t < vocab.loc_start for t in ids[:first_loc])  # the tone and the words come first
    broken = ids[:first_loc + 2] + ids[first_loc + 4:]  # the first object keeps only 2 of its 4 location tokens
    lay, dropped = parse_layout(broken, vocab, text_tok, LayoutRendererConfig())
    assert dropped == 1 and [o["colour"] for o in lay.objects] == ["blue"]
    unknown = layout_target(Layout("dark", [{**SCENE.objects[0], "colour": "pink"}]), vocab, text_tok)
    assert parse_layout(unknown, vocab, text_tok, LayoutRendererConfig())[1] == 1


def test_renderer_map_marks_each_box_with_its_object():
    r = LayoutRenderer(LayoutRendererConfig(width=8))
    t = r.encode([SCENE])
    index, feats = r.condition(**t)  # the pixels the boxes cover, and their features
    where = {tuple(i): f for i, f in zip(index.tolist(), feats)}
    assert (0, 19, 12) in where and (0, 50, 50) not in where  # inside the triangle's box (x 6.4-19.2, y 12.8-25.6)
    e = r.cfg.embed_dim
    f = where[(0, 19, 12)]
    assert abs(float(f[e])) < 0.1 and abs(float(f[e + 1])) < 0.1  # u, v: near the box centre
    want = (r.shape_embed.weight[2] + r.colour_embed.weight[0] + r.size_embed.weight[0]
            + r.tone_embed.weight[r.cfg.tones.index("dark")])
    assert torch.allclose(f[:e], want)
    n_small, n_large = (14 * 14, 28 * 28)  # 12.8 px and 25.6 px boxes, one pixel of margin (pixel centres)
    assert n_small + n_large - 60 < len(index) < n_small + n_large + 60
    img = r(**t)
    assert torch.allclose(img[0, :, 50, 20], r.background(r.tone_embed.weight[1]) + 0.5)  # outside: the background
    with pytest.raises(ValueError, match="unknown colour"):
        r.encode([Layout("dark", [{**SCENE.objects[0], "colour": "pink"}])])


def test_renderer_learns_to_draw_from_layouts(tiny_shapes):
    from tasks.data.shapes_images import load_images, read_split
    from tasks.layout_t2i import scene_layout

    ids, paths, _ = read_split(tiny_shapes, "train")
    scenes = {s["image_id"]: s for s in json.loads((tiny_shapes / "scenes_train.json").read_text())}
    images = load_images(paths[:16])
    layouts = [scene_layout(scenes[i], 64) for i in ids[:16]]
    torch.manual_seed(0)
    r = LayoutRenderer(LayoutRendererConfig(width=16))
    opt = torch.optim.Adam(r.parameters(), lr=1e-2)
    t = r.encode(layouts)
    losses = []
    for _ in range(60):
        loss = r.loss(images, **t)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.3 * losses[0], losses[::10]
    out = r.render(layouts)
    assert out.shape == (16, 3, 64, 64) and out.min() >= 0 and out.max() <= 1
    # the layout decides the picture: another layout, another image
    other = r.render([Layout(layouts[0].tone, layouts[1].objects)])
    assert (other[0] - out[0]).abs().mean() > 0.01


def test_renderer_save_load_and_refusals(tmp_path):
    torch.manual_seed(0)
    r = LayoutRenderer(LayoutRendererConfig(width=8)).eval()
    folder = r.save_pretrained(tmp_path / "renderer")
    back = LayoutRenderer.from_pretrained(folder)
    assert torch.equal(back.render([SCENE]), r.render([SCENE]))
    cfg = json.loads((folder / "config.json").read_text())
    for bad, match in (({**cfg, "_target_": "os.system"}, "never instantiates code"),
                       ({**cfg, "width": "64"}, "must be an int in"),
                       ({**cfg, "width": 10**9}, "must be an int in"),  # no allocation at will
                       ({**cfg, "colours": [f"c{i}" for i in range(5000)]}, "more than"),
                       ({**cfg, "shapes": ["circle", "circle"]}, "distinct single words"),
                       ({**cfg, "format": "other"}, "is not")):
        (folder / "config.json").write_text(json.dumps(bad))
        with pytest.raises(ValueError, match=match):
            LayoutRenderer.from_pretrained(folder)
    (folder / "config.json").unlink()
    with pytest.raises(FileNotFoundError, match="not a layout renderer folder"):
        LayoutRenderer.from_pretrained(folder)


def test_layout_scores():
    from tasks.layout_metrics import box_sane, layout_scores

    truth = [Layout("dark", [{"box": (0.1, 0.1, 0.3, 0.3), "size": "small", "colour": "red", "shape": "circle"},
                             {"box": (0.5, 0.5, 0.9, 0.9), "size": "large", "colour": "blue", "shape": "cross"}])]
    perfect = layout_scores(truth, truth, 64)
    assert all(v == 1.0 for v in perfect.values()), perfect
    assert box_sane(truth[0], 64)
    swapped = [Layout("dark", [{**truth[0].objects[0], "box": (0.5, 0.5, 0.7, 0.7)},
                               {**truth[0].objects[1], "colour": "green", "box": (0.1, 0.1, 0.5, 0.5)}])]
    s = layout_scores(swapped, truth, 64)
    assert s["layout_objects_acc"] == 0 and s["layout_colour_acc"] == 0 and s["layout_shape_acc"] == 1
    assert s["layout_count_acc"] == 1 and s["layout_size_acc"] == 0  # the blue cross is missing
    overlapping = [Layout("dark", [{**truth[0].objects[0], "box": (0.1, 0.1, 0.6, 0.6)}, truth[0].objects[1]])]
    assert not box_sane(overlapping[0], 64)


def test_layout_targets_follow_the_order_the_caption_names_objects():
    from tasks.layout_t2i import mention_order

    assert mention_order(SCENE, "a large blue circle to the right of a small red triangle") == [1, 0]
    assert mention_order(SCENE, "a small red triangle left of a large blue circle") == [0, 1]
    assert mention_order(SCENE, "two shapes") == [0, 1]  # named nowhere: the scene's own order
