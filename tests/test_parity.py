"""Parity with the reference code (BriLLM0.5) on tests/fixtures/official-tiny, and the converter's refusals."""

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modeling_brillm import BriLLMForCausalLM, sinusoidal_positions

FIXTURE = Path(__file__).parent / "fixtures" / "official-tiny"


@pytest.fixture(scope="module")
def reference():
    fixture = json.loads((FIXTURE / "fixture.json").read_text())
    return fixture, load_file(FIXTURE / "expected_outputs.safetensors"), load_file(FIXTURE / "expected_grads.safetensors")


@pytest.fixture(scope="module")
def model(converted_fixture):
    return BriLLMForCausalLM.from_pretrained(converted_fixture)


def test_slot_map_equals_reference(model, reference):
    fixture, _, _ = reference
    V = model.config.vocab_size
    nodes = torch.arange(V)
    slots = model.get_edge_graph().slots(nodes[:, None].expand(V, V), nodes[None, :].expand(V, V))
    assert torch.equal(slots, torch.tensor(fixture["slot_matrix"]))
    assert model.config.num_slots == fixture["config"]["num_param_slots"]


def test_positional_encoding(reference):
    _, expected, _ = reference
    table = sinusoidal_positions(512, 8, "cpu")
    # float32 sin/cos of arguments up to ~3e6: at most one ulp apart from the machine that made the fixture
    assert torch.allclose(table, expected["positional_encoding"].reshape(512, 8), atol=1.2e-7, rtol=0)
    longer = sinusoidal_positions(2000, 8, "cpu")
    assert torch.equal(longer[:512], table)


def test_full_vocabulary_logits_loss_and_energies(model, reference):
    fixture, expected, _ = reference
    ids = torch.tensor(fixture["inputs"]["token_ids"])
    with torch.no_grad():
        out = model(ids, labels=ids)
        base = model.model(ids)
    assert torch.allclose(out.logits[:, :-1], expected["full_logits"], atol=1e-6, rtol=0)
    assert abs(out.loss.item() - fixture["full_vocab_forward"]["loss"]) < 1e-5
    assert torch.allclose(base.energies[:, 0], expected["full_initial_energy"], atol=1e-6, rtol=0)
    assert torch.allclose(base.energies[:, 1:], expected["full_positive_energies"], atol=2e-6, rtol=0)


def test_sampled_loss_and_its_gradients(model, reference):
    fixture, expected, grads = reference
    ids = torch.tensor(fixture["inputs"]["token_ids"])
    candidates = expected["sampled_neighbor_ids"][..., 1]
    model.zero_grad()
    loss = model.sampled_loss(ids, candidates)
    assert abs(loss.item() - fixture["sampled_negatives_forward"]["loss"]) < 1e-5
    loss.backward()
    for name in ("weights", "biases", "node_bias", "positions"):
        got = getattr(model.model, name).grad
        assert torch.allclose(got, grads[name], atol=1e-7, rtol=1e-5), name
    # the train.py convention: the last edge of every sample is dropped
    train_loss = model.sampled_loss(ids[:, :-1], candidates[:, :-1])
    assert abs(train_loss.item() - fixture["sampled_negatives_forward"]["train_loop_loss"]) < 1e-5


def test_sampled_loss_rejects_candidates_without_the_true_token_first(model, reference):
    fixture, expected, _ = reference
    ids = torch.tensor(fixture["inputs"]["token_ids"])
    candidates = expected["sampled_neighbor_ids"][..., 1].flip(-1)
    with pytest.raises(ValueError, match="true next tokens"):
        model.sampled_loss(ids, candidates)


def test_converter_refuses_slot_count_mismatch(tmp_path, reference_converter):
    frequencies = json.loads((FIXTURE / "word_frequency.json").read_text())
    source = next(iter(frequencies))
    zero_target = next(t for t, c in frequencies[source].items() if c == 0)
    frequencies[source][zero_target] = 5  # one more owned edge than the checkpoint has slots
    path = tmp_path / "freq.json"
    path.write_text(json.dumps(frequencies))
    result = reference_converter(tmp_path / "out", frequencies=path)
    assert result.returncode == 2
    assert "has 1668 slots but" in result.stderr and "gives 1668 non-zero pairs, which need 1 + 1668 = 1669 slots" in result.stderr


def test_converter_refuses_vocabulary_out_of_order(tmp_path, reference_converter):
    vocab = json.loads((FIXTURE / "vocab.json").read_text())
    items = list(vocab.items())
    items[3], items[4] = items[4], items[3]
    path = tmp_path / "vocab.json"
    path.write_text(json.dumps(dict(items)))
    result = reference_converter(tmp_path / "out", vocab=path)
    assert result.returncode != 0 and "in file order" in result.stderr


def test_converter_refuses_missing_tensors_and_sources(tmp_path, reference_converter):
    state = torch.load(FIXTURE / "model.bin", weights_only=True)
    del state["node_bias"]
    checkpoint = tmp_path / "model.bin"
    torch.save(state, checkpoint)
    result = reference_converter(tmp_path / "out", checkpoint=checkpoint)
    assert result.returncode != 0 and "missing tensors ['node_bias']" in result.stderr

    frequencies = json.loads((FIXTURE / "word_frequency.json").read_text())
    frequencies.pop("[MASK]")
    path = tmp_path / "freq.json"
    path.write_text(json.dumps(frequencies))
    result = reference_converter(tmp_path / "out2", frequencies=path)
    assert result.returncode != 0 and "have no entry" in result.stderr
    assert not (tmp_path / "out").exists() and not (tmp_path / "out2").exists()


def test_character_vocabulary_gets_a_tokenizer(tmp_path, reference_converter, reference_files):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    tokens = ["<unk>", *"春眠不觉晓处闻啼鸟夜来风雨声花落知多少,."]
    checkpoint, vocab, frequencies = reference_files(tmp_path, tokens)
    result = reference_converter(tmp_path / "out", checkpoint=checkpoint, vocab=vocab, frequencies=frequencies)
    assert result.returncode == 0, result.stderr
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    text = "春眠不觉晓,处处闻啼鸟."
    ids = tokenizer(text, add_special_tokens=False).input_ids
    assert ids == [tokens.index(c) for c in text]
    assert tokenizer.decode(ids) == text
    assert tokenizer("春X", add_special_tokens=False).input_ids == [1, 0]  # unknown character -> <unk>
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out")
    out = model.generate(torch.tensor([ids]), max_new_tokens=5, do_sample=False)
    assert len(tokenizer.decode(out[0, len(ids):], skip_special_tokens=True)) == int((out[0, len(ids):] != 0).sum())


def test_bpe_tokenizer_json_is_checked_and_written(tmp_path, reference_converter, reference_files):
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, trainers
    from transformers import AutoTokenizer

    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    bpe.decoder = decoders.ByteLevel()
    text = ["In frogs, the hind legs are larger than the fore legs.", "The river runs by the city of frogs."] * 20
    bpe.train_from_iterator(text, trainers.BpeTrainer(
        vocab_size=120, special_tokens=["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet()))
    bpe.save(str(tmp_path / "bpe.json"))
    tokens = [t for t, _ in sorted(bpe.get_vocab().items(), key=lambda kv: kv[1])]
    checkpoint, vocab, frequencies = reference_files(tmp_path, tokens, owned_fraction=0.05)
    result = reference_converter(
        tmp_path / "out", "--tokenizer-json", str(tmp_path / "bpe.json"), checkpoint=checkpoint, vocab=vocab, frequencies=frequencies
    )
    assert result.returncode == 0, result.stderr
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out")
    sentence = "the hind legs of frogs"
    assert tokenizer(sentence, add_special_tokens=False).input_ids == bpe.encode(sentence).ids
    assert tokenizer.decode(bpe.encode(sentence).ids).strip() == sentence
    assert tokenizer.pad_token_id == 0 and tokenizer.unk_token_id == 1

    other = tmp_path / "other"
    other.mkdir()
    _, wrong_vocab, wrong_frequencies = reference_files(other, tokens[:-1] + ["zzz"], owned_fraction=0.05)
    result = reference_converter(
        tmp_path / "out2", "--tokenizer-json", str(tmp_path / "bpe.json"),
        checkpoint=checkpoint, vocab=wrong_vocab, frequencies=wrong_frequencies,
    )
    assert result.returncode != 0 and "does not match the vocabulary" in result.stderr
