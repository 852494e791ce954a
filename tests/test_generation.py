"""generate(): parity with the reference decoder, cache equivalence, batching, beams, sampling, streaming."""

import json
from pathlib import Path

import pytest
import torch
from transformers import TextStreamer

from modeling_brillm import BriLLMCache, BriLLMConfig, BriLLMForCausalLM

FIXTURE = Path(__file__).parent / "fixtures" / "official-tiny"


@pytest.fixture(scope="module")
def decoder_model(tmp_path_factory, fixture_converter):
    """The fixture converted with the reference decoder's conventions (position_shift=0, self-loops suppressed)."""
    out = fixture_converter(tmp_path_factory.mktemp("decoder") / "model", "--position-shift", "0")
    model = BriLLMForCausalLM.from_pretrained(out).eval()
    assert model.config.position_shift == 0 and model.config.suppress_self_loop
    return model


@pytest.fixture(scope="module")
def decode_cases():
    return json.loads((FIXTURE / "fixture.json").read_text())["greedy_decode"]["cases"]


def random_model(vocab_size=40, hidden_size=8, seed=0, **config):
    torch.manual_seed(seed)
    degrees = torch.randint(0, vocab_size + 1, (vocab_size,))
    degrees[0], degrees[1] = 0, vocab_size  # a node with no owned edge, one with all
    rows = [torch.sort(torch.randperm(vocab_size)[:k]).values for k in degrees.tolist()]
    col_idx = torch.cat(rows).int()
    row_ptr = torch.cat([torch.zeros(1, dtype=torch.long), torch.cumsum(degrees, 0)])
    cfg = BriLLMConfig(vocab_size=vocab_size, hidden_size=hidden_size, num_slots=1 + len(col_idx), **config)
    model = BriLLMForCausalLM.from_graph(cfg, row_ptr, col_idx).eval()
    with torch.no_grad():
        model.model.positions.normal_(0, 0.5)
    return model


def test_greedy_reproduces_reference_decoder(decoder_model, decode_cases):
    for case in decode_cases:
        prompt = torch.tensor([case["prompt_ids"]])
        out = decoder_model.generate(
            prompt, max_new_tokens=case["max_new_tokens"], do_sample=False,
            output_logits=True, output_scores=True, return_dict_in_generate=True,
        )
        assert out.sequences[0].tolist() == case["output_ids"]
        # The scores themselves, not only the argmax: every non-excluded candidate of every step.
        expected = torch.tensor([[float("nan") if v is None else v for v in row] for row in case["step_scores_vocab_order"]])
        got = torch.stack(out.logits, 1)[0]
        known = ~expected.isnan()
        assert torch.allclose(got[known], expected[known], atol=1e-6, rtol=0)
        processed = torch.stack(out.scores, 1)[0]  # after the logits processors
        assert torch.isneginf(processed[~known]).all() and torch.isfinite(processed[known]).all()


def test_left_padded_batch_equals_one_at_a_time(decoder_model, decode_cases):
    prompts = [case["prompt_ids"] for case in decode_cases]
    width = max(map(len, prompts))
    ids = torch.tensor([[0] * (width - len(p)) + p for p in prompts])
    mask = torch.tensor([[0] * (width - len(p)) + [1] * len(p) for p in prompts])
    out = decoder_model.generate(ids, attention_mask=mask, max_new_tokens=8, do_sample=False, pad_token_id=0)
    for row, case in zip(out, decode_cases):
        assert row[width:].tolist() == case["generated_ids"]


def test_cache_equals_no_cache_greedy_and_sampling():
    model = random_model()
    prompt = torch.tensor([[3, 7, 1, 9], [5, 5, 2, 8]])
    with_cache = model.generate(prompt, max_new_tokens=12, do_sample=False)
    without = model.generate(prompt, max_new_tokens=12, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, without)
    sampled = []
    for use_cache in (True, False):
        torch.manual_seed(123)
        sampled.append(model.generate(prompt, max_new_tokens=12, do_sample=True, top_k=10, top_p=0.9,
                                      temperature=0.8, num_return_sequences=3, use_cache=use_cache))
    assert sampled[0].shape == (6, 16)
    assert torch.equal(*sampled)


def test_beam_search_with_cache_equals_without():
    model = random_model(seed=3)
    prompt = torch.tensor([[4, 2, 11]])
    kwargs = dict(max_new_tokens=10, num_beams=4, num_return_sequences=4, do_sample=False,
                  return_dict_in_generate=True, output_scores=True)
    a = model.generate(prompt, **kwargs)
    b = model.generate(prompt, use_cache=False, **kwargs)
    assert torch.equal(a.sequences, b.sequences)
    assert torch.allclose(a.sequences_scores, b.sequences_scores, atol=1e-5)
    assert len({tuple(s) for s in a.sequences.tolist()}) == 4


def test_beam_search_reorders_the_cache(monkeypatch):
    """A cache that ignored beam reordering would change the result: prove reorder_cache is really exercised."""
    model = random_model(seed=3)
    prompt = torch.tensor([[4, 2, 11]])
    expected = model.generate(prompt, max_new_tokens=10, num_beams=4, do_sample=False)
    permutations = []
    real = BriLLMCache.reorder_cache

    def spy(self, beam_idx):
        permutations.append(beam_idx.tolist())
        real(self, beam_idx)

    monkeypatch.setattr(BriLLMCache, "reorder_cache", spy)
    assert torch.equal(model.generate(prompt, max_new_tokens=10, num_beams=4, do_sample=False), expected)
    assert any(p != sorted(p) for p in permutations)


def test_self_loop_suppression_only_in_generate():
    model = random_model(seed=5, suppress_self_loop=True)
    prompt = torch.tensor([[1, 1, 1]])  # node 1 owns every edge, including its self-loop
    out = model.generate(prompt, max_new_tokens=30, do_sample=True, top_k=0)
    seq = out[0].tolist()
    assert all(a != b for a, b in zip(seq[2:], seq[3:]))
    logits = model(prompt).logits
    assert torch.isfinite(logits).all()  # forward logits are never masked


def test_generation_past_learned_positions_matches_full_forward():
    model = random_model(max_position_embeddings=6, seed=7)
    prompt = torch.tensor([[2, 3, 4]])
    out = model.generate(prompt, max_new_tokens=20, do_sample=False, output_logits=True, return_dict_in_generate=True)
    full = model(out.sequences).logits  # one pass over 23 tokens, 17 past the learned positions
    steps = torch.stack(out.logits, 1)[0]
    assert torch.allclose(full[0, 2:-1], steps, atol=1e-5)


def test_text_streamer_prints_the_generated_text(tmp_path, capsys):
    from modeling_brillm.tokenization_brillm import character_tokenizer

    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate("abcdefghijklmnopqrstuvwxyz ")}}
    tokenizer = character_tokenizer(vocab)
    model = random_model(vocab_size=len(vocab), seed=11)
    ids = tokenizer("hello", return_tensors="pt").input_ids
    out = model.generate(ids, max_new_tokens=10, do_sample=False,
                         streamer=TextStreamer(tokenizer, skip_prompt=True, skip_special_tokens=True))
    printed = capsys.readouterr().out.strip()
    assert printed == tokenizer.decode(out[0, ids.shape[1]:], skip_special_tokens=True).strip()
    assert len(printed) > 0


def test_logits_to_keep_scores_only_the_last_positions():
    model = random_model(seed=2)
    ids = torch.tensor([[1, 5, 9, 2, 7]])
    full = model(ids).logits
    assert torch.allclose(model(ids, logits_to_keep=2).logits, full[:, -2:])


def test_assisted_decoding_equals_greedy(monkeypatch):
    model, assistant = random_model(seed=3), random_model(seed=4)
    prompt = torch.tensor([[4, 2, 11, 5]])
    expected = model.generate(prompt, max_new_tokens=20, do_sample=False)
    rollbacks = []
    real = BriLLMCache.crop

    def spy(self, tokens_to_remove):
        rollbacks.append(tokens_to_remove)
        real(self, tokens_to_remove)

    monkeypatch.setattr(BriLLMCache, "crop", spy)
    assert torch.equal(model.generate(prompt, max_new_tokens=20, do_sample=False, assistant_model=assistant), expected)
    assert any(n < 0 for n in rollbacks)  # the assistant's guesses were rejected and rolled back
    assert torch.equal(model.generate(prompt, max_new_tokens=20, do_sample=False, prompt_lookup_num_tokens=3), expected)


def test_cache_rolls_back_exactly():
    model = random_model(seed=8)
    ids = torch.tensor([[3, 9, 4, 4, 7, 1]])
    cache = model(ids[:, :3], use_cache=True).past_key_values
    cache.activate_past_recording()
    model(ids[:, 3:], past_key_values=cache)
    cache.crop(-3)
    assert cache.get_seq_length() == 3
    again = model(ids[:, 3:], past_key_values=cache).logits
    assert torch.allclose(again, model(ids).logits[:, 3:], atol=1e-6)
    with pytest.raises(ValueError, match="activate_past_recording"):
        model(ids[:, :2], use_cache=True).past_key_values.crop(-1)


def test_labels_outside_the_vocabulary_are_refused():
    model = random_model(seed=1)
    ids = torch.tensor([[1, 2, 3]])
    with pytest.raises(ValueError, match="-100 for positions to ignore"):
        model(ids, labels=torch.tensor([[1, 2, 40]]))
    assert model(ids, labels=torch.tensor([[1, -100, 3]])).loss.isfinite()
