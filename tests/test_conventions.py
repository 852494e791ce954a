"""transformers conventions a demanding user relies on (issue 12): loading info, tuples, config switches,
meta-device init, use_cache, the printed model, no embedding matrix, token-id dtypes."""

import pytest
import torch
from transformers import GPT2Config, GPT2LMHeadModel

from modeling_brillm import BriLLMConfig, BriLLMForCausalLM
from modeling_brillm.graph_brillm import dense_graph

IDS = torch.tensor([[1, 2, 3, 4], [4, 3, 2, 1]])


def tiny(**kwargs):
    torch.manual_seed(0)
    return BriLLMForCausalLM(BriLLMConfig(vocab_size=9, hidden_size=4, **kwargs)).eval()


def sparse():
    config = BriLLMConfig(vocab_size=4, hidden_size=4, num_slots=4)
    torch.manual_seed(0)
    return BriLLMForCausalLM.from_graph(config, [0, 2, 2, 3, 3], torch.tensor([1, 3, 0], dtype=torch.int32)).eval()


def test_from_pretrained_with_loading_info(tmp_path):
    tiny().save_pretrained(tmp_path)
    model, info = BriLLMForCausalLM.from_pretrained(tmp_path, output_loading_info=True)
    assert isinstance(model, BriLLMForCausalLM) and info["missing_keys"] == set() and info["unexpected_keys"] == set()


@pytest.mark.parametrize("how", ["argument", "config"])
def test_return_dict_false_gives_tuples_like_gpt2(how):
    model = tiny()
    gpt2 = GPT2LMHeadModel(GPT2Config(vocab_size=9, n_embd=8, n_layer=1, n_head=2)).eval()
    with torch.no_grad():  # (GPT-2 of transformers 5.23 itself breaks on config.return_dict=False)
        theirs = gpt2(IDS, labels=IDS, return_dict=False)
    kwargs = {"return_dict": False} if how == "argument" else {}
    model.config.return_dict = how != "config"
    with torch.no_grad():
        ours, base = model(IDS, labels=IDS, **kwargs), model.model(IDS, **kwargs)
    assert type(ours) is tuple and type(theirs) is tuple and len(ours) == len(theirs) == 3
    loss, logits, cache = ours
    assert loss.ndim == 0 and logits.shape == (2, 4, 9) and cache.get_seq_length() == 4
    assert type(base) is tuple and torch.equal(base[0], model.model(IDS, return_dict=True).last_hidden_state)
    with torch.no_grad():  # the lean decoding step honours it too
        step = model(IDS[:, -1:], past_key_values=cache, **kwargs)
    assert type(step) is tuple and step[0].shape == (2, 1, 9)


def test_config_output_hidden_states():
    model = tiny(output_hidden_states=True)
    with torch.no_grad():
        out, base = model(IDS), model.model(IDS)
    assert out.hidden_states is not None and torch.equal(out.hidden_states[0], base.last_hidden_state)
    assert base.hidden_states is not None


def test_meta_device_init_builds_the_dense_graph():
    config = BriLLMConfig(vocab_size=9, hidden_size=4)
    with torch.device("meta"):
        model = BriLLMForCausalLM(config)
    model.to_empty(device="cpu")
    with torch.no_grad():  # garbage where the graph should be, as to_empty leaves it
        model.model.graph.row_ptr.fill_(7)
    model.init_weights()
    row_ptr, col_idx = dense_graph(9)
    assert torch.equal(model.model.graph.row_ptr, row_ptr) and torch.equal(model.model.graph.col_idx, col_idx)
    assert model(IDS).logits.isfinite().all()


def test_meta_device_init_of_a_sparse_graph_then_load_state_dict():
    # FSDP / init_empty_weights: build empty, then load the real tensors, slot map included.
    reference = sparse()
    with torch.device("meta"):
        model = BriLLMForCausalLM(reference.config)
    model.to_empty(device="cpu")
    model.init_weights()
    with pytest.raises(ValueError, match="set_graph"):  # a sparse slot map cannot come from the config
        model(IDS % 4)
    model.load_state_dict(reference.state_dict())
    with torch.no_grad():
        assert torch.equal(model.eval()(IDS % 4).logits, reference(IDS % 4).logits)


def test_dense_checkpoint_without_slot_map_loads(tmp_path):
    from safetensors.torch import load_file, save_file

    model = tiny()
    model.save_pretrained(tmp_path)
    tensors = {k: v for k, v in load_file(tmp_path / "model.safetensors").items() if ".graph." not in k}
    save_file(tensors, tmp_path / "model.safetensors", metadata={"format": "pt"})
    with torch.no_grad():
        assert torch.equal(BriLLMForCausalLM.from_pretrained(tmp_path)(IDS).logits, model(IDS).logits)


def test_use_cache_in_config():
    assert BriLLMConfig(vocab_size=9, hidden_size=4).use_cache is True
    with torch.no_grad():
        assert tiny()(IDS).past_key_values is not None
        assert tiny(use_cache=False)(IDS).past_key_values is None
    with pytest.raises(ValueError, match="use_cache"):
        BriLLMConfig(vocab_size=9, hidden_size=4, use_cache="yes")


def test_printed_model_shows_its_size():
    text = repr(sparse())
    for fact in ("vocab_size=4", "hidden_size=4", "num_slots=4", "sparse: 3 owned edges", "weights=(4, 4, 4)"):
        assert fact in text, text
    assert f"parameters={sparse().num_parameters():,}" in text


@pytest.mark.parametrize("call", ["get_input_embeddings", "set_input_embeddings", "resize_token_embeddings"])
def test_no_embedding_matrix(call):
    model = tiny()
    args = {"set_input_embeddings": (torch.nn.Embedding(9, 4),), "resize_token_embeddings": (12,)}.get(call, ())
    for module in (model, model.model):
        with pytest.raises(NotImplementedError, match="BriLLM has no embedding matrix"):
            getattr(module, call)(*args)


@pytest.mark.parametrize("dtype", [torch.uint8, torch.int8, torch.int16, torch.float32, torch.bool])
def test_token_ids_of_other_dtypes_are_refused_clearly(dtype):
    model = tiny()
    for module in (model, model.model):
        with pytest.raises(ValueError, match="int64 or int32"):
            module(IDS.to(dtype))


def test_int32_token_ids_work():
    model = tiny()
    with torch.no_grad():
        assert torch.equal(model(IDS.int()).logits, model(IDS).logits)


