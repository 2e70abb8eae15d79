"""The VQ image tokenizer: round trip, code range, unified ids, save/load, training step, dead-code restart."""
import json
import types

import pytest
import torch

from conftest import TINY_VQ
from modalities.image_codes import ImageCodeTokenizer, VQConfig
from zoo.vocab import VocabLayout


pytestmark = pytest.mark.usefixtures("one_thread")  # micro models (tests/conftest.py)


@pytest.fixture(scope="module")
def tok(tiny_vq):
    return tiny_vq  # the shared micro VQ (tests/conftest.py)


def test_round_trip_shapes_and_code_range(tok):
    x = torch.rand(3, 3, 64, 64)
    codes = tok.encode(x)
    assert tok.grid == (8, 8) and tok.num_tokens == 64
    assert codes.shape == (3, 8, 8) and codes.dtype == torch.long
    assert 0 <= int(codes.min()) and int(codes.max()) < tok.num_codes
    img = tok.decode(codes)
    assert img.shape == (3, 3, 64, 64) and 0 <= float(img.min()) and float(img.max()) <= 1
    # decoding the codes equals decoding the quantized latents of the same images
    z_q, _, _ = tok.quantize(tok.encode_latents(x))
    assert torch.allclose(img, tok.decode_latents(z_q).clamp(0, 1), atol=1e-5)
    assert torch.equal(tok.decode(codes.flatten(1)), img)  # [B, h*w] rows are accepted too


def test_chunked_cpu_inference_equals_one_batch(tok, monkeypatch):
    import modalities.image_codes as image_codes

    codes = torch.randint(0, tok.num_codes, (7, 8, 8), generator=torch.Generator().manual_seed(0))
    img = tok.decode(codes)
    x = torch.cat([img, torch.rand(7, 3, 64, 64)])
    enc = tok.encode(x)
    monkeypatch.setattr(image_codes, "CPU_CHUNK", 3)  # 7 and 14 images → chunks of 3, 3, 1 / 3, ..., 2
    chunked = tok.decode(codes)
    # each image decodes from its own codes, in order (kernels differ by batch size: 1e-5)
    assert chunked.shape == img.shape and torch.allclose(chunked, img, atol=1e-5)
    assert not torch.allclose(chunked[0], chunked[1], atol=1e-3)
    assert torch.equal(tok.encode(x), enc)


def test_bad_inputs_raise(tok):
    with pytest.raises(ValueError, match="64x64"):
        tok.encode(torch.rand(1, 3, 32, 32))
    with pytest.raises(ValueError, match=r"\[0, 16\)"):
        tok.decode(torch.full((1, 8, 8), 16))
    with pytest.raises(ValueError, match="codes"):
        tok.decode(torch.zeros(1, 5, 5, dtype=torch.long))
    with pytest.raises(ValueError, match="divisible"):
        VQConfig(channels=[12, 16], norm_num_groups=8)


def test_unified_ids(tok):
    layout = VocabLayout(text_size=100, image_code_size=32, loc_bins=4)
    codes = torch.arange(16).view(1, 4, 4)
    ids = tok.to_unified(codes, layout)
    lo, hi = layout.ranges()["image_codes"]
    assert int(ids.min()) == lo and int(ids.max()) < hi
    assert torch.equal(tok.from_unified(ids, layout), codes)
    mask = tok.allowed_mask(layout)
    assert mask.sum() == 16 and mask[lo:lo + 16].all() and not mask[2]  # no EOS
    with pytest.raises(ValueError, match="outside"):
        tok.from_unified(torch.tensor([lo + 16]), layout)
    with pytest.raises(ValueError, match="reserves 8 image codes"):
        tok.check_layout(VocabLayout(text_size=100, image_code_size=8))


def test_save_load_equality(tok, tmp_path):
    folder = tok.save_pretrained(tmp_path / "vq")
    assert {p.name for p in folder.iterdir()} == {"config.json", "diffusion_pytorch_model.safetensors"}
    assert json.loads((folder / "config.json").read_text())["_class_name"] == "VQModel"
    back = ImageCodeTokenizer.from_pretrained(folder)
    sd, sd2 = tok.state_dict(), back.state_dict()
    assert sd.keys() == sd2.keys() and all(torch.equal(sd[k], sd2[k]) for k in sd)
    x = torch.rand(2, 3, 64, 64)
    assert torch.equal(back.encode(x), tok.encode(x))
    assert torch.equal(back.decode(tok.encode(x)), tok.decode(tok.encode(x)))
    with pytest.raises(FileNotFoundError, match="not a VQ tokenizer folder"):
        ImageCodeTokenizer.from_pretrained(tmp_path)
    (tmp_path / "bad").mkdir()
    (tmp_path / "bad" / "config.json").write_text(json.dumps({"_class_name": "UNet2DModel"}))
    (tmp_path / "bad" / "diffusion_pytorch_model.safetensors").write_bytes(b"")
    with pytest.raises(ValueError, match="not a VQModel"):
        ImageCodeTokenizer.from_pretrained(tmp_path / "bad")


def test_local_encoder_codes_depend_on_their_neighbourhood(tmp_path):
    torch.manual_seed(0)
    cfg = dict(channels=(8, 8, 8, 8), latent_channels=4, num_codes=16, norm_num_groups=4)
    local = ImageCodeTokenizer.from_config(VQConfig(**cfg, local_encoder=True)).eval()
    default = ImageCodeTokenizer.from_config(VQConfig(**cfg)).eval()
    flat = torch.tensor([0.3, 0.5, 0.2])[None, :, None, None].expand(1, 3, 64, 64)
    z = local.encode_latents(flat)
    assert torch.equal(z, z[..., :1, :1].expand_as(z))  # a plain image: the same latent at the border as inside
    assert not torch.allclose(default.encode_latents(flat), default.encode_latents(flat)[..., :1, :1])

    def far_change(tok: ImageCodeTokenizer) -> float:  # latents 5+ cells from a changed 16-px corner
        x = torch.rand(2, 3, 64, 64)
        y = x.clone()
        y[:, :, :16, :16] = 0
        with torch.no_grad():
            d = (tok.encode_latents(x) - tok.encode_latents(y)).abs()
        return float(d[..., 6:, 6:].max() / d[..., :2, :2].max())

    assert far_change(local) < 0.1 < far_change(default)  # the global GroupNorm statistics reach everywhere
    with torch.no_grad():  # training-mode batches move the running statistics, which save/load must keep
        local.train().encode_latents(torch.rand(4, 3, 64, 64))
    local.eval()
    back = ImageCodeTokenizer.from_pretrained(local.save_pretrained(tmp_path / "vq"))
    assert json.loads((tmp_path / "vq" / "config.json").read_text())["mmzoo_local_encoder"] is True
    x = torch.rand(2, 3, 64, 64)
    assert torch.equal(back.encode_latents(x), local.encode_latents(x))
    assert torch.equal(back.encode(x), local.encode(x))
    kept = local.compacted(torch.ones(16), 0.0)  # a rebuilt tokenizer stays local
    assert torch.equal(kept.encode_latents(x), local.encode_latents(x))


def test_vq_task_learns_and_restarts_dead_codes(tiny_shapes):
    from tasks.data.shapes_images import load_images, read_split
    from tasks.tools.vq import VQTask, psnr

    torch.manual_seed(0)
    _, paths, _ = read_split(tiny_shapes, "train")
    x = load_images(paths[:8]).float() / 255
    task = VQTask(vq=TINY_VQ, restart_every=0)
    opt = torch.optim.Adam(task.parameters(), lr=3e-3)
    losses = []
    for _ in range(12):
        rec, vq_loss, codes, h = task(x)
        loss = torch.nn.functional.mse_loss(rec, x) + vq_loss
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(float(loss))
    assert losses[-1] < 0.5 * losses[0], losses
    assert psnr(x, x).min() > 90  # identical images: capped, not inf
    # codes unused for restart_every steps move onto latents of the batch
    task.hparams.restart_every = 1
    task.log = lambda *a, **k: None
    before = task.tokenizer.vq.quantize.embedding.weight.detach().clone()
    codes = torch.zeros(1, 8, 8, dtype=torch.long)  # only code 0 used
    task._restart_dead_codes(codes, h.detach())
    after = task.tokenizer.vq.quantize.embedding.weight
    assert torch.equal(after[0], before[0]) and not torch.equal(after[1:], before[1:])
    flat = h.detach().permute(0, 2, 3, 1).reshape(-1, h.shape[1])
    assert all((flat == after[i]).all(-1).any() for i in range(1, 16))
    # data-dependent init: every code starts on an encoder output of the first batch
    task._init_codebook(x)
    assert bool(task.codebook_initialised)
    flat = task.tokenizer.encode_latents(x).detach().permute(0, 2, 3, 1).reshape(-1, h.shape[1])
    weight = task.tokenizer.vq.quantize.embedding.weight
    assert all(torch.isclose(flat, weight[i]).all(-1).any() for i in range(16))


def test_vq_autoencoder_warmup_then_codebook_starts_on_trained_latents(tiny_shapes):
    from tasks.data.shapes_images import load_images, read_split
    from tasks.tools.vq import VQTask

    torch.manual_seed(0)
    _, paths, _ = read_split(tiny_shapes, "train")
    x = load_images(paths[:8]).float() / 255
    task = VQTask(vq=TINY_VQ, autoencode_steps=2)
    task.log = task.log_dict = lambda *a, **k: None
    codebook = task.tokenizer.vq.quantize.embedding.weight
    before = codebook.detach().clone()
    # warm-up (global_step 0 < 2): plain reconstruction, the codebook neither used nor initialised
    loss = task.training_step({"image": x}, 0)
    loss.backward()
    assert codebook.grad is None and not bool(task.codebook_initialised)
    assert task.tokenizer.vq.encoder.conv_in.weight.grad.abs().sum() > 0
    assert torch.equal(codebook.detach(), before)
    expected = torch.nn.functional.mse_loss(task.tokenizer.decode_latents(task.tokenizer.encode_latents(x)), x)
    assert torch.isclose(loss, expected)
    # past the warm-up the first quantised batch initialises the codebook on its latents
    task.hparams.autoencode_steps = 0
    task.zero_grad()
    task.training_step({"image": x}, 1).backward()
    assert bool(task.codebook_initialised) and codebook.grad is not None
    with torch.no_grad():
        flat = task.tokenizer.encode_latents(x).permute(0, 2, 3, 1).reshape(-1, codebook.shape[1])
    assert all(torch.isclose(flat, codebook[i].detach(), atol=1e-5).all(-1).any() for i in range(len(codebook)))
    # a warm-up as long as the run would save an untrained codebook: refused before training starts
    task.hparams.autoencode_steps = 5
    task._trainer = types.SimpleNamespace(estimated_stepping_batches=5)
    with pytest.raises(ValueError, match="autoencode_steps=5 leaves none of the 5"):
        task.configure_optimizers()


def test_compaction_drops_near_duplicate_and_unused_codes(tok):
    weight = tok.vq.quantize.embedding.weight.detach()
    dist = torch.cdist(weight, weight)
    usage = torch.arange(tok.num_codes, 0, -1)  # code 0 most used, ...
    usage[-1] = 0                               # the last code is never used
    delta = float(dist[dist > 0].median())
    small = tok.compacted(usage, delta)
    assert 2 <= small.num_codes < tok.num_codes - 1
    kept = small.vq.quantize.embedding.weight.detach()
    # the kept codes are the most used ones that are >= delta apart, renumbered in order of use
    assert torch.equal(kept[0], weight[0])
    gaps = torch.cdist(kept, kept) + torch.eye(len(kept)) * 1e9
    assert float(gaps.min()) >= delta
    assert not any(torch.equal(weight[-1], k) for k in kept)
    # the encoder and decoder are unchanged: latents snap to the nearest kept code
    x = torch.rand(2, 3, 64, 64)
    codes = small.encode(x)
    assert int(codes.max()) < small.num_codes
    h = small.encode_latents(x).permute(0, 2, 3, 1)
    assert torch.equal(codes, torch.cdist(h.reshape(-1, h.shape[-1]), kept).argmin(1).view(codes.shape))
    assert small.decode(codes).shape == (2, 3, 64, 64)
    # distance 0 keeps every used code, in order of use
    assert tok.compacted(usage, 0.0).num_codes == tok.num_codes - 1


def test_compaction_bad_input(tok):
    usage = torch.ones(tok.num_codes, dtype=torch.long)
    with pytest.raises(ValueError, match="shape"):
        tok.compacted(usage[:3], 0.1)
    with pytest.raises(ValueError, match=">= 0"):
        tok.compacted(usage, -1.0)
    with pytest.raises(ValueError, match="keeps 1 code"):
        tok.compacted(usage, 1e9)
    counts = tok.code_usage(torch.randint(0, 256, (3, 3, 64, 64), dtype=torch.uint8))
    assert counts.shape == (tok.num_codes,) and int(counts.sum()) == 3 * tok.num_tokens


def test_vq_task_saves_the_compacted_tokenizer(tiny_shapes, tmp_path):
    from tasks.tools.vq import ensure_vq_tokenizer

    spec = {"task": {"vq": TINY_VQ, "compact_distance": 0.0}, "max_steps": 2, "seed": 0, "precision": "32-true",
            "data": {"root": str(tiny_shapes), "shapes": {"n_train": 64, "n_val": 16, "n_test": 16},
                     "batch_size": 4}}
    folder = ensure_vq_tokenizer(spec, tmp_path)
    tok = ImageCodeTokenizer.from_pretrained(folder)
    from tasks.data.shapes_images import load_images, read_split

    images = load_images(read_split(tiny_shapes, "train")[1])
    usage = tok.code_usage(images)
    # distance 0 drops exactly the codes no training image uses: every saved code is used
    assert 2 <= tok.num_codes <= TINY_VQ["num_codes"] and bool((usage > 0).all())
    assert ensure_vq_tokenizer(spec, tmp_path) == folder  # cached: the spec's hash names the folder
