"""Generation options: no-repeat-ngram, top-k/top-p sampling with temperature, prefix-trie constraints;
all with the KV cache and together with the ``allowed`` mask."""
import pytest
import torch

import zoo
from zoo.generation import NoRepeatNGram, PrefixTrie, beam_search, generate, greedy_search, sample_next
from zoo.vocab import EOS_ID, PAD_ID


@pytest.fixture(scope="module")
def model():
    torch.manual_seed(0)
    return zoo.create_model("test-tiny").eval()


def _memory(m, b=4, seed=0):
    g = torch.Generator().manual_seed(seed)
    s = m.cfg.modalities["image"]["image_size"]
    ids = torch.randint(m.layout.text_start, m.layout.image_code_start, (b, 5), generator=g)
    return m.encode({"image": torch.randn(b, 3, s, s, generator=g), "text": (ids, torch.ones(b, 5, dtype=torch.bool))})


def _strip(row):
    row = row.tolist()
    return row[: row.index(EOS_ID)] if EOS_ID in row else [t for t in row if t != PAD_ID]


def test_no_repeat_ngram_bans_completions():
    logits = torch.zeros(2, 10)
    prefix = torch.tensor([[5, 6, 7, 5], [1, 2, 3, 4]])
    out = NoRepeatNGram(2)(4, prefix, logits.clone())
    assert out[0, 6] < -1e30 and (out[0, torch.arange(10) != 6] == 0).all()  # "5 6" seen: 6 may not follow 5
    assert (out[1] == 0).all()
    out = NoRepeatNGram(1)(4, prefix, logits.clone())
    assert (out[0, [5, 6, 7]] < -1e30).all() and out[0, 8] == 0


@pytest.mark.parametrize("num_beams", [1, 3])
def test_no_repeat_ngram_in_generation(model, num_beams):
    memory, mm = _memory(model)
    allowed = model.layout.allowed_mask("text")
    out = (greedy_search(model, memory, mm, 20, allowed=allowed, processors=[NoRepeatNGram(2)], min_new_tokens=19)
           if num_beams == 1 else
           beam_search(model, memory, mm, 20, num_beams=3, allowed=allowed, processors=[NoRepeatNGram(2)],
                       min_new_tokens=19))
    for row in out:
        toks = _strip(row)
        grams = list(zip(toks, toks[1:]))
        assert len(grams) == len(set(grams)), toks
        assert all(model.layout.text_start <= t < model.layout.image_code_start for t in toks)


def test_sampling_filters():
    logits = torch.tensor([[4.0, 3.0, 2.0, 1.0, 0.0]]).repeat(2000, 1)
    g = torch.Generator().manual_seed(0)
    assert (sample_next(logits, top_k=1, generator=g) == 0).all()
    assert (sample_next(logits, top_p=1e-6, generator=g) == 0).all()
    assert set(sample_next(logits, top_k=2, generator=g).tolist()) == {0, 1}
    # top_p=0.8: p = softmax = [.64,.24,.09,.03,.01] → keep tokens 0 and 1 (mass before token 2 is .87 ≥ .8)
    assert set(sample_next(logits, top_p=0.8, generator=g).tolist()) == {0, 1}
    # temperature: frequencies follow softmax(logits / T)
    for t in (0.5, 2.0):
        draws = sample_next(logits, temperature=t, generator=g)
        freq = torch.bincount(draws, minlength=5).float() / len(draws)
        assert torch.allclose(freq, torch.softmax(logits[0] / t, -1), atol=0.04)
    with pytest.raises(ValueError):
        sample_next(logits, temperature=0)


def test_sampling_uses_cache_and_respects_allowed(model):
    memory, mm = _memory(model)
    allowed = model.layout.allowed_mask("image_codes")
    lo, hi = model.layout.ranges()["image_codes"]
    runs = [greedy_search(model, memory, mm, 8, allowed=allowed, do_sample=True, top_k=5, top_p=0.9,
                          temperature=1.3, use_cache=cache, generator=torch.Generator().manual_seed(1))
            for cache in (True, False)]
    assert torch.equal(runs[0], runs[1])  # the KV cache path samples the same sequence
    toks = runs[0][(runs[0] != PAD_ID) & (runs[0] != EOS_ID)]
    assert ((toks >= lo) & (toks < hi)).all()
    with pytest.raises(ValueError, match="num_beams=1"):
        generate(model, {"image": torch.zeros(1, 3, 32, 32), "text": (torch.tensor([[5]]), torch.ones(1, 1, dtype=torch.bool))},
                 4, num_beams=2, do_sample=True)


def test_prefix_trie_states_and_masks():
    trie = PrefixTrie([[10, 11], [10, 12, 13], [20]], vocab_size=30)
    prefix = torch.tensor([[10, 12], [10, 11], [20, EOS_ID]])
    assert trie.states(prefix[:, :0]).tolist() == [0, 0, 0]
    out = trie(0, prefix[:, :0], torch.zeros(3, 30))
    assert ((out > -1) == torch.isin(torch.arange(30), torch.tensor([10, 20]))).all(1).all()
    out = trie(2, prefix, torch.zeros(3, 30))
    assert torch.nonzero(out[0] > -1).flatten().tolist() == [13]
    assert torch.nonzero(out[1] > -1).flatten().tolist() == [EOS_ID]
    assert torch.nonzero(out[2] > -1).flatten().tolist() == [EOS_ID]  # left the trie: EOS only


@pytest.mark.parametrize("num_beams", [1, 4])
def test_trie_constrained_generation_spells_a_candidate(model, num_beams):
    memory, mm = _memory(model, b=6)
    t0 = model.layout.text_start
    cands = [[t0 + 5, t0 + 6], [t0 + 5, t0 + 7, t0 + 8], [t0 + 9], [t0 + 40, t0 + 41, t0 + 42, t0 + 43]]
    trie = PrefixTrie(cands, model.layout.size)
    allowed = model.layout.allowed_mask("text")
    allowed[t0 + 9] = False  # the allowed mask composes with the trie: candidate 3 becomes impossible
    kw = dict(allowed=allowed, processors=[trie])
    out = (greedy_search(model, memory, mm, 6, **kw) if num_beams == 1
           else beam_search(model, memory, mm, 6, num_beams=num_beams, **kw))
    for row in out:
        assert EOS_ID in row.tolist()
        assert _strip(row) in [c for c in cands if c != [t0 + 9]]


def test_beam_length_penalty_and_processors_together(model):
    memory, mm = _memory(model)
    allowed = model.layout.allowed_mask("text")
    outs = [generate(model, {"image": torch.zeros(2, 3, 32, 32),
                             "text": (torch.full((2, 3), model.layout.text_start + 1), torch.ones(2, 3, dtype=torch.bool))},
                     10, num_beams=3, length_penalty=lp, allowed=allowed, no_repeat_ngram_size=1)
            for lp in (0.0, 2.0)]
    for out in outs:
        for row in out:
            toks = _strip(row)
            assert len(toks) == len(set(toks))  # no unigram repeats
