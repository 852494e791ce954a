"""Numerics of `BriLLMForCausalLM` against a slow, obvious oracle written from SPEC.md.

The oracle below shares no code with the package: it walks every text token by token, takes an explicit
softmax over the positional logits of the earlier edges (SPEC §4), looks every edge's slot up in a Python
dict built from the CSR map (SPEC §2), and scores every target with its own ``x @ W + b + PE`` (SPEC §3).
It is checked once against the reference code's own outputs (``fixtures/official-tiny``), then used as the
ground truth for logits, the Hugging Face loss, gradients, long texts, padding and the cache.

Conventions the tests rely on (from the package's docstrings):
* ``logits[:, i]`` scores the token after ``input_ids[:, i]`` with PE[i + position_shift] (i counts real tokens);
  the first token's signal is ``GELU(1/d + node_bias + PE[0])`` whatever ``position_shift`` is.
* Masked positions (``attention_mask == 0``) never advance the signal and get all-zero logits.
* Texts longer than ``max_position_embeddings``: edges past the last learned position reuse its positional
  weight, and the sinusoidal encoding simply continues (BriLLMConfig docstring).
"""

import json
import math
import pathlib

import pytest
import torch

from modeling_brillm import BriLLMConfig, BriLLMForCausalLM
from modeling_brillm.graph_brillm import BriLLMEdgeGraph

FIXTURE = pathlib.Path(__file__).parent / "fixtures" / "official-tiny"
PARAMS = ("weights", "biases", "node_bias", "positions")


# ----------------------------------------------------------------------------------------------------------------
# The oracle


def oracle_pe(num_positions, d):
    """SPEC §3, verbatim float32 expression (the frequency multiplies)."""
    div = 10000.0 ** (torch.arange(0, d, 2) / d)
    position = torch.arange(0, num_positions).reshape(-1, 1)
    pe = torch.zeros(num_positions, d)
    pe[:, 0::2] = torch.sin(position * div)
    pe[:, 1::2] = torch.cos(position * div)
    return pe


def oracle_gelu(z):
    return 0.5 * z * (1.0 + torch.erf(z / math.sqrt(2.0)))


def oracle_slot_table(row_ptr, col_idx):
    """{(source, target): slot} of the owned edges; every other edge uses slot 0 (SPEC §2)."""
    row_ptr, col_idx = [int(v) for v in row_ptr], [int(v) for v in col_idx]
    table = {}
    for source in range(len(row_ptr) - 1):
        for k in range(row_ptr[source], row_ptr[source + 1]):
            table[(source, col_idx[k])] = 1 + k
    return table


class Oracle:
    def __init__(self, vocab_size, hidden_size, max_positions, position_shift, slot_table):
        self.V, self.d, self.max_positions, self.shift = vocab_size, hidden_size, max_positions, position_shift
        self.slot_table = slot_table

    def slot(self, source, target):
        return self.slot_table.get((source, target), 0)

    def text_logits(self, tokens, params):
        """(n, V) logits of one text of n real tokens: row i scores the token after tokens[i]."""
        W, b, node_bias, positions = (params[k] for k in PARAMS)
        V, d = self.V, self.d
        pe = oracle_pe(len(tokens) + self.shift + 1, d).to(W.dtype)
        energies, rows = [], []
        for i, source in enumerate(tokens):
            if i == 0:
                x = oracle_gelu(1.0 / d + node_bias[source, 0] + pe[0])
            else:
                # Explicit softmax over the positional logits of edges 0 .. i-1; past the learned table the
                # last learned logit is reused.
                logit = torch.stack([positions[0, min(j, self.max_positions - 1), 0] for j in range(i)])
                weight = torch.exp(logit - logit.max())
                weight = weight / weight.sum()
                x = sum(weight[j] * energies[j] for j in range(i))
            row = []
            for target in range(V):
                s = self.slot(source, target)
                y = oracle_gelu(x @ W[s] + b[s, 0] + pe[i + self.shift])
                row.append(torch.sqrt((y * y).sum()))
                if i + 1 < len(tokens) and target == tokens[i + 1]:
                    energy = y
            rows.append(torch.stack(row))
            if i + 1 < len(tokens):
                energies.append(energy)
        return torch.stack(rows)

    def batch_logits(self, input_ids, attention_mask, params):
        """(B, L, V): each row's real tokens scored alone, zeros at masked columns."""
        B, L = input_ids.shape
        out = torch.zeros(B, L, self.V, dtype=params["weights"].dtype)
        for b in range(B):
            columns = [c for c in range(L) if attention_mask is None or int(attention_mask[b, c]) == 1]
            if columns:
                out[b, columns] = self.text_logits([int(input_ids[b, c]) for c in columns], params)
        return out

    def loss(self, logits, labels):
        """HF causal-LM loss: logits[:, c] against labels[:, c + 1], -100 ignored, mean over counted terms."""
        terms = []
        B, L, _ = logits.shape
        for b in range(B):
            for c in range(L - 1):
                label = int(labels[b, c + 1])
                if label == -100:
                    continue
                row = logits[b, c]
                terms.append(row.max() + torch.log(torch.exp(row - row.max()).sum()) - row[label])
        return torch.stack(terms).mean()


def oracle_for(model):
    config, graph = model.config, model.get_edge_graph()
    table = oracle_slot_table(graph.row_ptr, graph.col_idx)
    return Oracle(config.vocab_size, config.hidden_size, config.max_position_embeddings, config.position_shift, table)


def oracle_params(model, dtype=torch.float64, requires_grad=False):
    return {
        k: getattr(model.model, k).detach().to(dtype).clone().requires_grad_(requires_grad) for k in PARAMS
    }


# ----------------------------------------------------------------------------------------------------------------
# Models under test


def ragged_graph(vocab_size, generator):
    """Random CSR map with ragged out-degrees: node 0 owns nothing, node 1 owns all V edges, node 2 owns only
    its self-loop, others random (some empty)."""
    row_ptr, col_idx = [0], []
    for source in range(vocab_size):
        if source == 0:
            targets = []
        elif source == 1:
            targets = list(range(vocab_size))
        elif source == 2:
            targets = [2]
        else:
            degree = int(torch.randint(0, vocab_size + 1, (1,), generator=generator))
            targets = sorted(torch.randperm(vocab_size, generator=generator)[:degree].tolist())
        col_idx += targets
        row_ptr.append(len(col_idx))
    return torch.tensor(row_ptr, dtype=torch.int64), torch.tensor(col_idx, dtype=torch.int32)


def make_model(vocab_size=11, hidden_size=8, dense=False, seed=0, positions_scale=1.0, **config_kwargs):
    generator = torch.Generator().manual_seed(seed)
    with torch.random.fork_rng():  # seeded init without disturbing other tests' global RNG
        torch.manual_seed(seed)
        if dense:
            model = BriLLMForCausalLM(BriLLMConfig(vocab_size=vocab_size, hidden_size=hidden_size, **config_kwargs))
        else:
            row_ptr, col_idx = ragged_graph(vocab_size, generator)
            config = BriLLMConfig(
                vocab_size=vocab_size, hidden_size=hidden_size, num_slots=1 + len(col_idx), **config_kwargs
            )
            model = BriLLMForCausalLM.from_graph(config, row_ptr, col_idx)
    with torch.no_grad():  # random positional logits (the reference init is all ones, which hides mistakes)
        model.model.positions.copy_(torch.randn(model.model.positions.shape, generator=generator) * positions_scale)
    return model


def random_ids(batch, length, vocab_size, seed):
    generator = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, vocab_size, (batch, length), generator=generator)
    # Make sure the special rows are visited: a node with no owned edge, one with all, a self-loop.
    ids[0, :4] = torch.tensor([0, 1, 2, 2])
    return ids


def max_error(a, b):
    return (a.double() - b.double()).abs().max().item()


# ----------------------------------------------------------------------------------------------------------------
# 0. The oracle itself reproduces the reference code


def test_oracle_matches_reference_fixture():
    from safetensors.torch import load_file

    fixture = json.loads((FIXTURE / "fixture.json").read_text())
    expected = load_file(str(FIXTURE / "expected_outputs.safetensors"))
    state = torch.load(FIXTURE / "model.bin", weights_only=True)
    V, d = fixture["config"]["vocab_size"], fixture["config"]["hidden_size"]

    # torch's vectorised sin/cos may differ by one float32 ulp between CPUs (3 of 4096 entries here).
    assert max_error(oracle_pe(512, d), expected["positional_encoding"]) <= 6e-8

    slot_matrix = fixture["slot_matrix"]
    table = {(s, t): slot_matrix[s][t] for s in range(V) for t in range(V) if slot_matrix[s][t] != 0}
    oracle = Oracle(V, d, 512, 1, table)
    params = {k: state[k].double() for k in PARAMS}
    for b, tokens in enumerate(fixture["inputs"]["token_ids"]):
        logits = oracle.text_logits(tokens, params)[:-1]  # the reference scores the n-1 edges
        assert max_error(logits, expected["full_logits"][b]) < 1e-5


# ----------------------------------------------------------------------------------------------------------------
# 1. Logits and loss


CASES = [
    pytest.param(dict(dense=False, position_shift=1), id="sparse-shift1"),
    pytest.param(dict(dense=False, position_shift=0), id="sparse-shift0"),
    pytest.param(dict(dense=True, vocab_size=6, position_shift=1), id="dense-shift1"),
    pytest.param(dict(dense=True, vocab_size=6, position_shift=0), id="dense-shift0"),
    pytest.param(dict(dense=False, position_shift=2, seed=1), id="sparse-shift2"),
    pytest.param(dict(dense=False, positions_scale=30.0, seed=3), id="sparse-large-positional-logits"),
]


@pytest.mark.parametrize("case", CASES)
def test_logits_and_loss_match_oracle(case):
    model = make_model(**case)
    V = model.config.vocab_size
    ids = random_ids(3, 9, V, seed=1)
    out = model(ids, labels=ids)
    oracle = oracle_for(model)
    params = oracle_params(model)
    expected = oracle.batch_logits(ids, None, params)
    assert out.logits.shape == (3, 9, V)
    assert out.logits.dtype == torch.float32
    assert max_error(out.logits, expected) < 1e-5
    assert abs(out.loss.item() - oracle.loss(expected, ids).item()) < 1e-5


def test_sparse_graph_shares_slot_zero():
    """Every target a source does not own gets the one shared score; a node with no owned edge scores all
    targets alike."""
    model = make_model()
    ids = torch.tensor([[0, 3, 1, 5, 0]])
    logits = model(ids).logits[0]
    assert torch.all(logits[0] == logits[0, 0])  # node 0 owns nothing
    assert torch.all(logits[4] == logits[4, 0])
    owned = oracle_for(model).slot_table
    shared = [t for t in range(model.config.vocab_size) if (3, t) not in owned]
    if len(shared) > 1:
        assert torch.all(logits[1, shared] == logits[1, shared[0]])


# ----------------------------------------------------------------------------------------------------------------
# 2. Gradients


def model_and_oracle_grads(model, ids, attention_mask, labels):
    model.zero_grad()
    loss = model(ids, attention_mask=attention_mask, labels=labels).loss
    loss.backward()
    params = oracle_params(model, requires_grad=True)
    oracle = oracle_for(model)
    oracle_loss = oracle.loss(oracle.batch_logits(ids, attention_mask, params), labels)
    oracle_loss.backward()
    assert abs(loss.item() - oracle_loss.item()) < 1e-5
    return {k: getattr(model.model, k).grad for k in PARAMS}, {k: params[k].grad for k in PARAMS}


def assert_grads_close(got, expected, tol=1e-5):
    """Absolute error below ``tol`` for gradients of order 1 (relative to the largest entry when larger)."""
    for name in PARAMS:
        assert got[name] is not None, name
        assert got[name].shape == expected[name].shape, name
        err = max_error(got[name], expected[name])
        scale = max(1.0, expected[name].abs().max().item())
        assert err < tol * scale, f"{name}: max abs error {err:.3g} (largest entry {scale:.3g})"


@pytest.mark.parametrize("case", CASES[:3])
def test_gradients_match_oracle(case):
    model = make_model(**case)
    ids = random_ids(3, 8, model.config.vocab_size, seed=2)
    got, expected = model_and_oracle_grads(model, ids, None, ids)
    assert_grads_close(got, expected)
    # 8 tokens: edges 0 .. 6. The last token's logits (which average edge 6 in) have no label, so
    # positions[6:] get no gradient and every earlier one does.
    assert got["positions"][0, 6:].abs().max() == 0
    assert got["positions"][0, :6].abs().min() > 0


def test_gradients_with_padding_and_ignored_labels():
    model = make_model(seed=5)
    V = model.config.vocab_size
    ids = random_ids(3, 9, V, seed=4)
    mask = torch.ones_like(ids)
    mask[1, :3] = 0  # left padding
    mask[2, 6:] = 0  # right padding
    mask[0, 4] = 0  # a hole: the signal skips it
    labels = ids.masked_fill(mask == 0, -100)
    labels[0, 2] = -100  # an ignored real label
    ids = ids.masked_fill(mask == 0, 0)  # whatever the pad id, it must not matter
    got, expected = model_and_oracle_grads(model, ids, mask, labels)
    assert_grads_close(got, expected)
    logits = model(ids, attention_mask=mask).logits
    assert max_error(logits, oracle_for(model).batch_logits(ids, mask, oracle_params(model))) < 1e-5
    assert torch.all(logits[mask == 0] == 0)  # documented: padding gets all-zero logits


def test_gradients_when_no_scored_source_owns_an_edge():
    """Every position's source is node 0 (no owned edge): the kernel scores only the shared slot. Cross-entropy
    of such all-equal rows has zero gradient, so weight the logits with random coefficients instead."""
    model = make_model()
    ids = torch.tensor([[0, 0, 0, 0], [0, 0, 0, 0]])
    coefficients = torch.randn(2, 4, model.config.vocab_size, generator=torch.Generator().manual_seed(0))
    (model(ids).logits * coefficients).sum().backward()
    params = oracle_params(model, requires_grad=True)
    (oracle_for(model).batch_logits(ids, None, params) * coefficients.double()).sum().backward()
    got = {k: getattr(model.model, k).grad for k in PARAMS}
    assert got["weights"][0].abs().max() > 0
    assert got["weights"][1:].abs().max() == 0
    assert_grads_close(got, {k: params[k].grad for k in PARAMS})


# ----------------------------------------------------------------------------------------------------------------
# 3. Texts longer than max_position_embeddings


LONG_CASES = [
    pytest.param(8, 1, id="8-learned-shift1"),
    pytest.param(8, 0, id="8-learned-shift0"),
    pytest.param(1, 1, id="1-learned"),
]


@pytest.mark.parametrize("max_positions, position_shift", LONG_CASES)
def test_long_context_reuses_last_positional_weight(max_positions, position_shift):
    """20 tokens (19 edges), max_positions learned positional weights: every edge j >= max_positions - 1 uses
    positions[max_positions - 1] (BriLLMConfig docstring: "edges past the last learned position reuse its
    weight"), while PE keeps counting: edge i adds PE[i + position_shift], far past the learned table. No crash,
    same numbers as the oracle with that rule, and the same through the cache step by step."""
    model = make_model(seed=7, max_position_embeddings=max_positions, position_shift=position_shift)
    ids = random_ids(2, 20, model.config.vocab_size, seed=8)
    got, expected = model_and_oracle_grads(model, ids, None, ids)
    assert_grads_close(got, expected)
    logits = model(ids).logits
    assert max_error(logits, oracle_for(model).batch_logits(ids, None, oracle_params(model))) < 1e-5
    # The shared last weight collects the gradient of every late edge.
    assert got["positions"][0, -1, 0].abs() > 0

    # The oracle's rule is told apart from another one: a 20-entry table whose late entries differ.
    other = oracle_for(model)
    other.max_positions = 20
    params = oracle_params(model)
    late = torch.linspace(-2.0, 2.0, 20 - max_positions, dtype=params["positions"].dtype).view(1, -1, 1)
    params["positions"] = torch.cat([params["positions"], late], 1)
    assert max_error(logits, other.batch_logits(ids, None, params)) > 1e-3

    # The cache follows the same rule step by step.
    model.eval()
    out = model(ids[:, :1], use_cache=True)
    steps = [out.logits]
    for k in range(1, 20):
        out = model(ids[:, k : k + 1], past_key_values=out.past_key_values)
        steps.append(out.logits)
    assert max_error(torch.cat(steps, 1), logits) < 1e-6


# ----------------------------------------------------------------------------------------------------------------
# 4. The cache


@pytest.mark.parametrize("position_shift", [0, 1])
def test_cached_steps_equal_full_forward(position_shift):
    model = make_model(seed=9, position_shift=position_shift).eval()
    ids = random_ids(2, 12, model.config.vocab_size, seed=10)
    full = model(ids).logits
    for first in (1, 4):
        out = model(ids[:, :first], use_cache=True)
        pieces = [out.logits]
        for k in range(first, ids.shape[1]):
            out = model(ids[:, k : k + 1], past_key_values=out.past_key_values, use_cache=True)
            pieces.append(out.logits)
        assert max_error(torch.cat(pieces, 1), full) < 1e-6
    # Chunks of several tokens.
    out, pieces, k = None, [], 0
    for size in (3, 1, 5, 3):
        out = model(ids[:, k : k + size], past_key_values=None if out is None else out.past_key_values, use_cache=True)
        pieces.append(out.logits)
        k += size
    assert out.past_key_values.get_seq_length() == 12
    assert max_error(torch.cat(pieces, 1), full) < 1e-6
    assert max_error(model(ids, logits_to_keep=1).logits, full[:, -1:]) < 1e-6


def test_left_padding_equals_each_text_alone():
    model = make_model(seed=11).eval()
    V = model.config.vocab_size
    generator = torch.Generator().manual_seed(1)
    texts = [torch.tensor([1, 0, 2, 2, 5, 1, 9]), torch.randint(0, V, (4,), generator=generator), torch.tensor([0])]
    texts.append(torch.tensor([], dtype=torch.long))  # an all-padding row: its first cached step starts the text
    L, B = 7, len(texts)
    ids = torch.zeros(B, L, dtype=torch.long)
    mask = torch.zeros(B, L, dtype=torch.long)
    for b, text in enumerate(texts):
        ids[b, L - len(text) :] = text
        mask[b, L - len(text) :] = 1
    out = model(ids, attention_mask=mask, use_cache=True)
    nxt = torch.randint(0, V, (B, 2), generator=torch.Generator().manual_seed(0))
    step1 = model(nxt[:, :1], attention_mask=torch.cat([mask, torch.ones(B, 1, dtype=torch.long)], 1),
                  past_key_values=out.past_key_values)
    step2 = model(nxt[:, 1:], attention_mask=torch.cat([mask, torch.ones(B, 2, dtype=torch.long)], 1),
                  past_key_values=step1.past_key_values)
    for b, text in enumerate(texts):
        alone = model(torch.cat([text, nxt[b]])[None]).logits[0]
        n = len(text)
        if n:
            assert max_error(out.logits[b, L - n :], alone[:n]) < 1e-6
        assert max_error(step1.logits[b, 0], alone[n]) < 1e-6
        assert max_error(step2.logits[b, 0], alone[n + 1]) < 1e-6
        assert torch.all(out.logits[b, : L - n] == 0)


# ----------------------------------------------------------------------------------------------------------------
# 5. bfloat16 weights


def test_bfloat16_weights():
    model = make_model(seed=12)
    ids = random_ids(2, 8, model.config.vocab_size, seed=13)
    reference = model(ids).logits.detach()
    model.to(torch.bfloat16)
    assert model.model.weights.dtype == torch.bfloat16
    out = model(ids, labels=ids)
    assert out.logits.dtype == torch.float32 and torch.isfinite(out.logits).all()
    assert max_error(out.logits, reference) < 0.02 * reference.abs().max().item()
    # bfloat16 only stores the parameters: the arithmetic is float32, so the oracle run on the bf16-rounded
    # parameters agrees to float32 rounding.
    exact = oracle_for(model).batch_logits(ids, None, oracle_params(model))
    assert max_error(out.logits, exact) < 1e-5
    out.loss.backward()
    for name in PARAMS:
        grad = getattr(model.model, name).grad
        assert grad.dtype == torch.bfloat16 and torch.isfinite(grad.float()).all()
    cache = model(ids[:, :5], use_cache=True).past_key_values
    step = model(ids[:, 5:6], past_key_values=cache).logits
    assert max_error(step[:, 0], out.logits[:, 5]) < 1e-5


# ----------------------------------------------------------------------------------------------------------------
# 6. Helpful errors


def raises(fragment, fn, *args, **kwargs):
    with pytest.raises(ValueError) as info:
        fn(*args, **kwargs)
    assert fragment in str(info.value), str(info.value)


def test_bad_inputs_raise():
    model = make_model(vocab_size=6, dense=True)
    ids = torch.tensor([[1, 2, 3]])
    raises("token id 6, outside this model's vocabulary [0, 6)", model, torch.tensor([[1, 6]]))
    raises("token id -1, outside", model, torch.tensor([[-1, 2]]))
    raises("input_ids is empty (shape (1, 0))", model, torch.zeros(1, 0, dtype=torch.long))
    raises("input_ids is empty (shape (0, 3))", model, torch.zeros(0, 3, dtype=torch.long))
    raises("shape (batch, length)", model, torch.tensor([1, 2, 3]))
    raises("integer tensor", model, torch.tensor([[1.0, 2.0]]))
    raises("integer tensor", model, [[1, 2]])
    raises("integer tensor", model, torch.tensor([[True, False]]))
    raises("attention_mask has shape (1, 2)", model, ids, attention_mask=torch.ones(1, 2))
    raises("attention_mask must be a (batch, length)", model, ids, attention_mask=torch.ones(3))
    raises("only 0 (padding) and 1", model, ids, attention_mask=torch.tensor([[1, 2, 1]]))
    raises("only 0 (padding) and 1", model, ids, attention_mask=torch.tensor([[1.0, 0.5, 1.0]]))
    raises("labels must have the shape of input_ids (1, 3)", model, ids, labels=torch.tensor([[1, 2]]))
    cache = model(ids, use_cache=True).past_key_values
    raises("the cache holds 1 texts", model, torch.tensor([[1], [2]]), past_key_values=cache)


def test_bad_configs_raise():
    raises("hidden_size must be even", BriLLMConfig, vocab_size=8, hidden_size=7)
    raises("vocab_size must be an integer >= 2", BriLLMConfig, vocab_size=1)
    raises("exceeds the dense graph's 1 + vocab_size**2 = 65", BriLLMConfig, vocab_size=8, num_slots=66)
    raises("position_shift must be an integer >= 0", BriLLMConfig, vocab_size=8, position_shift=-1)
    raises("num_slots must be an integer >= 1", BriLLMConfig, vocab_size=8, num_slots=0)


def test_bad_graphs_raise():
    config = BriLLMConfig(vocab_size=3, hidden_size=4, num_slots=4)
    row_ptr = torch.tensor([0, 2, 2, 3])
    raises("num_slots=4 but the graph owns 2 edges: set num_slots=3", BriLLMForCausalLM.from_graph,
           config, row_ptr, torch.tensor([0, 1], dtype=torch.int32))
    graph = BriLLMEdgeGraph(vocab_size=3, num_slots=4)
    raises("strictly increasing", graph.set_graph, row_ptr, torch.tensor([2, 0, 1], dtype=torch.int32))
    raises("strictly increasing", graph.set_graph, row_ptr, torch.tensor([1, 1, 1], dtype=torch.int32))
    raises("outside [0, 3)", graph.set_graph, row_ptr, torch.tensor([0, 3, 1], dtype=torch.int32))
    raises("outside [0, 3)", graph.set_graph, row_ptr, torch.tensor([-1, 2, 1], dtype=torch.int32))
    raises("end at num_slots - 1 = 3", graph.set_graph, torch.tensor([0, 2, 2, 2]), torch.tensor([0, 1, 2]))
    raises("expected row_ptr (4,)", graph.set_graph, torch.tensor([0, 3]), torch.tensor([0, 1, 2]))
    raises("never decrease", graph.set_graph, torch.tensor([0, 3, 1, 3]), torch.tensor([0, 1, 2]))
    graph.set_graph(row_ptr, torch.tensor([0, 2, 1], dtype=torch.int32))  # a valid one is accepted

    # A sparse model built from its config alone has no slot map yet: it must refuse to run.
    model = BriLLMForCausalLM(config)
    raises("set_graph()/from_graph()", model, torch.tensor([[0, 1, 2]]))
