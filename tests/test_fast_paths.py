"""The fast paths against the general ones: sparse vs dense gradients, no-grad vs autograd scoring, generation's
lean decoding step vs full forwards, batched vs one-at-a-time generation, and the optional GPU kernel."""

import pytest
import torch
from test_numerics import PARAMS, make_model, max_error, oracle_for, oracle_params, random_ids
from transformers import GenerationMixin

from modeling_brillm import BriLLMCache, BriLLMForCausalLM
from modeling_brillm import signal_brillm
from modeling_brillm.modeling_brillm import BriLLMModel
from modeling_brillm.scoring_brillm import GatherSlots, triton_scores


def grads(model, loss_fn, sparse):
    model.set_sparse_gradients(sparse)
    model.zero_grad(set_to_none=True)
    loss_fn(model).backward()
    return {k: getattr(model.model, k).grad for k in PARAMS}


def padded_batch(model, seed=4):
    ids = random_ids(3, 9, model.config.vocab_size, seed=seed)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, 6:] = 0  # right padding
    mask[0, 4] = 0  # a hole
    return ids.masked_fill(mask == 0, 0), mask, ids.masked_fill(mask == 0, -100)


LOSSES = {
    "full": lambda m, ids, mask, labels: m(ids, attention_mask=mask, labels=labels).loss,
    # Only the last position is scored: the true edges of earlier ones lie outside the kernel's sparse rows.
    "last-position": lambda m, ids, mask, labels: (m(ids, attention_mask=mask, logits_to_keep=1).logits ** 2).sum(),
    # Only the signals: no scoring kernel at all, the true-edge gather alone carries the gradient.
    "signals-only": lambda m, ids, mask, labels: (m.model(ids, attention_mask=mask).last_hidden_state ** 2).sum(),
}


@pytest.mark.parametrize("loss", LOSSES)
def test_sparse_gradients_equal_dense_gradients(loss):
    model = make_model(seed=5)
    ids, mask, labels = padded_batch(model)
    fn = lambda m: LOSSES[loss](m, ids, mask, labels)  # noqa: E731
    dense, sparse = grads(model, fn, False), grads(model, fn, True)
    for name in PARAMS:
        assert not dense[name].is_sparse
        assert sparse[name].is_sparse == (name in ("weights", "biases")), name
        assert max_error(sparse[name].to_dense(), dense[name]) < 1e-6, name
    rows = sparse["weights"].coalesce().indices()[0]
    assert rows.numel() < model.config.num_slots  # only touched slots are stored
    if loss == "full":  # one coalesced gradient: slot 0 and the slabs of the scored sources
        indices = sparse["weights"]._indices()[0]
        assert torch.equal(indices, rows)
        graph = model.get_edge_graph()
        sources = ids[mask.bool()].unique()
        expected = torch.cat([torch.zeros(1, dtype=torch.long)] + [
            torch.arange(1 + graph.row_ptr[s], 1 + graph.row_ptr[s + 1]) for s in sources.tolist()
        ])  # fmt: skip
        assert torch.equal(indices, expected)


@pytest.mark.parametrize("sparse", [False, True])
def test_true_edge_gradient_is_merged_into_the_kernels(sparse, monkeypatch):
    """The recurrence's gather adds its rows into the scoring kernel's gradient instead of returning its own, so
    autograd never sums two weight gradients (a full-size or concatenated copy per step)."""
    model = make_model(seed=2)
    ids = random_ids(2, 7, model.config.vocab_size, seed=3)
    returned = []
    real = GatherSlots.backward

    def spy(ctx, grad):
        out = real(ctx, grad)
        returned.append(out[0])
        return out

    monkeypatch.setattr(GatherSlots, "backward", staticmethod(spy))
    got = grads(model, lambda m: m(ids, labels=ids).loss, sparse)
    assert len(returned) == 2 and all(g is None for g in returned)  # weights and biases
    params = oracle_params(model, requires_grad=True)
    oracle = oracle_for(model)
    oracle.loss(oracle.batch_logits(ids, None, params), ids).backward()
    for name in PARAMS:
        assert max_error(got[name].to_dense(), params[name].grad) < 1e-5, name


def test_partial_backward_then_full_backward():
    """A backward that needs only some parameters leaves nothing stale behind for the next one."""
    model = make_model(seed=6)
    ids = random_ids(2, 8, model.config.vocab_size, seed=7)
    expected = grads(model, lambda m: m(ids, labels=ids).loss, True)
    for sparse in (False, True):
        model.set_sparse_gradients(sparse)
        model.zero_grad(set_to_none=True)
        loss = model(ids, labels=ids).loss
        torch.autograd.grad(loss, [model.model.positions], retain_graph=True)
        loss.backward()
        for name in PARAMS:
            assert max_error(getattr(model.model, name).grad.to_dense(), expected[name].to_dense()) < 1e-6, name


def test_sparse_gradients_train_with_sgd_like_dense():
    model = make_model(seed=8)
    ids = random_ids(3, 9, model.config.vocab_size, seed=9)
    results = []
    for sparse in (False, True):
        trained = make_model(seed=8)
        trained.set_sparse_gradients(sparse)
        optimizer = torch.optim.SGD(trained.parameters(), lr=0.1)
        for _ in range(3):
            optimizer.zero_grad(set_to_none=True)
            trained(ids, labels=ids).loss.backward()
            optimizer.step()
        results.append(trained)
    for name in PARAMS:
        assert max_error(getattr(results[0].model, name), getattr(results[1].model, name)) < 1e-6, name
    assert max_error(results[0].model.weights, model.model.weights) > 1e-3  # it did train


def test_kept_gradient_storage_holds_only_this_batch():
    """Dense slot gradients reuse the previous step's storage once it is released (graph_brillm.zeroed_gradient):
    rows another batch touched come back zero, a held gradient is never overwritten, accumulation still adds."""
    from modeling_brillm import graph_brillm

    model = make_model(seed=10, vocab_size=23)
    weights = model.model.weights
    first, second = (random_ids(2, 6, 23, seed=s) for s in (11, 12))
    assert set(first.unique().tolist()) != set(second.unique().tolist())

    def loss(ids):
        return model(ids, labels=ids).loss

    expected = {name: g.clone() for name, g in grads(model, lambda m: loss(second), False).items()}
    model.eval()  # lets the kept storage go: the next gradient is a new tensor
    assert weights not in graph_brillm._kept_gradients
    model.train()
    grads(model, lambda m: loss(first), False)
    pointer = weights.grad.data_ptr()
    reused = grads(model, lambda m: loss(second), False)  # zero_grad(set_to_none=True) released the first
    assert reused["weights"].data_ptr() == pointer
    for name in PARAMS:
        assert torch.equal(reused[name], expected[name]), name
    held = weights.grad
    again = grads(model, lambda m: loss(first), False)["weights"]
    assert again.data_ptr() != held.data_ptr() and torch.equal(held, expected["weights"])
    again = again.clone()
    del held
    loss(second).backward()  # accumulates into the gradient the first batch left (a new tensor is added in)
    assert max_error(weights.grad, again + expected["weights"]) < 1e-6


@pytest.mark.parametrize("dense", [False, True])
def test_no_grad_scoring_equals_autograd_scoring(dense):
    model = make_model(dense=dense, vocab_size=6 if dense else 11, seed=10)
    ids, mask, _ = padded_batch(model, seed=11)
    with_grad = model(ids, attention_mask=mask).logits
    assert with_grad.requires_grad
    with torch.no_grad():
        without = model(ids, attention_mask=mask).logits
    assert max_error(with_grad, without) == 0


def decoded_logits(model, ids, first):
    """Logits of the prefix ``ids[:, :first]``, then of each further token fed alone through the cache."""
    with torch.no_grad():
        out = model(ids[:, :first], use_cache=True)
        pieces = [out.logits]
        for k in range(first, ids.shape[1]):
            mask = torch.ones(ids.shape[0], k + 1, dtype=torch.long)
            out = model(ids[:, k : k + 1], attention_mask=mask, past_key_values=out.past_key_values)
            pieces.append(out.logits)
    return torch.cat(pieces, 1)


LEAN_CASES = [
    pytest.param(1, dict(position_shift=0), id="batch1-shift0"),
    pytest.param(1, dict(position_shift=1, max_position_embeddings=5), id="batch1-past-learned-positions"),
    pytest.param(4, dict(position_shift=1), id="batch4"),
    pytest.param(4, dict(position_shift=2, max_position_embeddings=5, positions_scale=30.0), id="batch4-large-logits"),
]


@pytest.mark.parametrize("batch, config", LEAN_CASES)
def test_lean_decoding_step_equals_full_forward(batch, config, monkeypatch):
    model = make_model(seed=12, **config).eval()
    ids = random_ids(batch, 14, model.config.vocab_size, seed=13)
    ids[-1, 5:9] = ids[0, 5:9]  # rows that share sources, so that batched steps group them
    taken = []
    real = BriLLMModel._decode_step

    def spy(self, *args):
        logits = real(self, *args)
        taken.append(logits is not None)
        return logits

    monkeypatch.setattr(BriLLMModel, "_decode_step", spy)
    full = model(ids).logits
    expected = oracle_for(model).batch_logits(ids, None, oracle_params(model))
    assert max_error(full, expected) < 1e-5
    for first in (1, 3):
        taken.clear()
        steps = decoded_logits(model, ids, first)
        assert taken == [False] + [True] * (ids.shape[1] - first)  # the prefix, then every step lean
        assert max_error(steps, full) < 1e-6


def test_unpadded_recurrence_equals_the_general_one(monkeypatch):
    """Whole texts take `flow_unpadded`; a recording cache sends the same texts through `flow_reference`."""
    model = make_model(seed=20, position_shift=2, max_position_embeddings=6)
    ids = random_ids(3, 11, model.config.vocab_size, seed=21)
    lean_runs = []
    real = signal_brillm.flow_unpadded
    monkeypatch.setattr(signal_brillm, "flow_unpadded", lambda *a: lean_runs.append(1) or real(*a))
    for grad in (False, True):
        recording = BriLLMCache()
        recording.activate_past_recording()
        with torch.set_grad_enabled(grad):
            lean = model(ids, labels=ids, use_cache=True)
            general = model(ids, labels=ids, past_key_values=recording, use_cache=True)
        assert max_error(lean.logits, general.logits) == 0 and torch.equal(lean.loss, general.loss)
        for name in BriLLMCache._TENSORS:
            assert torch.equal(getattr(lean.past_key_values, name), getattr(general.past_key_values, name)), name
        assert lean.past_key_values.seen_positions == general.past_key_values.seen_positions == ids.shape[1]
    assert len(lean_runs) == 2  # once per grad mode: the recording cache never took it


def test_lean_decoding_step_with_bfloat16_weights():
    model = make_model(seed=14).eval().to(torch.bfloat16)
    ids = random_ids(1, 10, model.config.vocab_size, seed=15)
    full = model(ids).logits
    assert max_error(decoded_logits(model, ids, 2), full) < 1e-5


def test_chunks_the_lean_step_cannot_take_go_the_general_way(monkeypatch):
    """A text whose first token arrives in a one-token chunk, and a padded step, fall back and stay exact."""
    model = make_model(seed=16).eval()
    V = model.config.vocab_size
    ids = torch.tensor([[0, 3, 4, 5], [1, 6, 7, 8]])
    mask = torch.tensor([[0, 0, 0, 0], [1, 1, 1, 1]])  # row 0 is all padding: its first token comes next
    with torch.no_grad():
        out = model(ids, attention_mask=mask, use_cache=True)
        nxt = torch.tensor([[2], [9]])
        mask = torch.cat([mask, torch.ones(2, 1, dtype=torch.long)], 1)
        assert model.model._decode_step(nxt, mask, out.past_key_values) is None  # row 0 has no token yet
        step = model(nxt, attention_mask=mask, past_key_values=out.past_key_values).logits
        alone = model(torch.tensor([[2]])).logits
        assert max_error(step[0], alone[0]) < 1e-6
        for bad, cache in ((torch.tensor([[V], [1]]), out.past_key_values), (torch.tensor([[-1]]), alone_cache(model))):
            assert model.model._decode_step(bad, None, cache) is None
            with pytest.raises(ValueError, match="outside this model's vocabulary"):
                model(bad, past_key_values=cache)


def alone_cache(model):
    return model(torch.tensor([[1, 2]]), use_cache=True).past_key_values


def test_batched_generation_equals_one_at_a_time():
    model = make_model(vocab_size=40, seed=17).eval()
    prompts = random_ids(6, 4, 40, seed=18)
    prompts[3] = prompts[1]  # identical rows: the batched step scores them as one group
    prompts[4, -1] = prompts[2, -1]  # same source, different history
    batched = model.generate(prompts, max_new_tokens=12, do_sample=False)
    for row, prompt in zip(batched, prompts):
        alone = model.generate(prompt[None], max_new_tokens=12, do_sample=False)[0]
        assert torch.equal(row, alone)


def test_generation_step_inputs_equal_the_generic_ones(monkeypatch):
    """The lean `prepare_inputs_for_generation` returns, at every decoding step, what transformers' own would."""
    model = make_model(vocab_size=30, seed=22).eval()
    lean, generic = BriLLMForCausalLM.prepare_inputs_for_generation, GenerationMixin.prepare_inputs_for_generation
    generic_calls, steps = [], []

    def counted_generic(self, *args, **kwargs):
        generic_calls.append(1)
        return generic(self, *args, **kwargs)

    def both(self, input_ids, next_sequence_length=None, **kwargs):
        before = len(generic_calls)
        ours = lean(self, input_ids, next_sequence_length=next_sequence_length, **kwargs)
        steps.append(len(generic_calls) == before)  # the lean branch answered, not the generic one
        expected = generic(self, input_ids, next_sequence_length, **kwargs)
        assert ours.keys() == expected.keys()
        for key, value in ours.items():
            assert torch.equal(value, expected[key]) if torch.is_tensor(value) else value == expected[key], key
        return ours

    monkeypatch.setattr(GenerationMixin, "prepare_inputs_for_generation", counted_generic)
    monkeypatch.setattr(BriLLMForCausalLM, "prepare_inputs_for_generation", both)
    prompts, mask = random_ids(3, 5, 30, seed=23), torch.ones(3, 5, dtype=torch.long)
    mask[1, :2] = 0
    for options in (dict(do_sample=False), dict(do_sample=True, top_k=5), dict(num_beams=2),
                    dict(output_hidden_states=True, return_dict_in_generate=True)):  # fmt: skip
        steps.clear()
        model.generate(prompts, attention_mask=mask, max_new_tokens=4, **options)
        assert steps.count(True) == 3, options  # the prefill goes the generic way, every later step the lean one


def test_edge_graph_slot_of_one_edge_equals_slots():
    model = make_model(seed=19)
    graph = model.get_edge_graph()
    V = model.config.vocab_size
    sources, targets = torch.arange(V).repeat_interleave(V), torch.arange(V).repeat(V)
    expected = graph.slots(sources, targets).tolist()
    assert [graph.slot(s, t) for s, t in zip(sources.tolist(), targets.tolist())] == expected


@pytest.mark.skipif(not torch.cuda.is_available(), reason="the optional Triton kernel needs a CUDA GPU")
def test_triton_kernel_equals_pytorch_scoring():
    pytest.importorskip("triton", reason="the optional Triton kernel needs the triton package")
    model = make_model(vocab_size=60, hidden_size=32, seed=20).eval().cuda()
    ids = random_ids(4, 16, 60, seed=21).cuda()
    with torch.no_grad():
        fast = model(ids).logits
        triton_scores.enabled = False
        try:
            plain = model(ids).logits
        finally:
            triton_scores.enabled = True
    assert triton_scores.available()
    assert max_error(fast, plain) < 1e-5


@pytest.mark.parametrize("dense", [False, True], ids=["ragged", "dense"])
def test_scoring_fast_paths_equal_the_reference(dense):
    """`scoring_brillm.score` (autograd and in-place no-grad) against `reference_scores`, values and gradients."""
    from modeling_brillm.scoring_brillm import plan_scoring, reference_scores, score

    model = make_model(dense=dense, seed=30)
    base, graph = model.model, model.get_edge_graph()
    generator = torch.Generator().manual_seed(31)
    sources = torch.randint(0, model.config.vocab_size, (23,), generator=generator)
    sources[:4] = torch.tensor([0, 1, 2, 2])  # no own edge, all own edges, a self-loop, a repeated source
    signals = torch.randn(23, model.config.hidden_size, generator=generator, requires_grad=True)
    pe = torch.randn(23, model.config.hidden_size, generator=generator)
    weight = torch.randn(23, model.config.vocab_size, generator=generator)

    expected = reference_scores(graph, base.weights, base.biases, sources, signals, pe)
    grads_expected = torch.autograd.grad((expected * weight).sum(), (signals, base.weights, base.biases))
    fast = score(graph, base.weights, base.biases, plan_scoring(graph, sources), signals, pe)
    grads_fast = torch.autograd.grad((fast * weight).sum(), (signals, base.weights, base.biases))
    with torch.no_grad():
        in_place = score(graph, base.weights, base.biases, plan_scoring(graph, sources), signals, pe)
    assert max_error(fast, expected) < 1e-5 and max_error(in_place, expected) < 1e-5
    for got, want in zip(grads_fast, grads_expected):
        assert max_error(got, want) < 1e-4 * max(1.0, want.abs().max().item())


@pytest.mark.parametrize("sparse", [False, True], ids=["dense", "sparse"])
def test_one_backward_through_two_forwards(sparse):
    """The gather's in-place addition into the scoring gradient must not be lost when one backward runs through
    two forwards (autograd may have summed the first scoring gradient already)."""
    model = make_model(seed=3)
    model.set_sparse_gradients(sparse)
    first, second = random_ids(3, 6, model.config.vocab_size, seed=1), random_ids(3, 6, model.config.vocab_size, seed=2)

    def gradients(backward):
        model.zero_grad(set_to_none=True)
        backward()
        return {k: getattr(model.model, k).grad.to_dense() for k in PARAMS}

    together = gradients(lambda: (model(first, labels=first).loss + model(second, labels=second).loss).backward())
    apart = gradients(lambda: [model(ids, labels=ids).loss.backward() for ids in (first, second)])
    for name in PARAMS:
        assert max_error(together[name], apart[name]) < 1e-6, name
