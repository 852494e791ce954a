"""Edge-graph building: streaming bigram counts (dense and sparse) against brute force, the CSR slot map,
per-source caps, statistics, and the model built on the graph."""

from collections import Counter

import numpy as np
import pytest
import torch

from modeling_brillm import BriLLMConfig, BriLLMForCausalLM, graph_building
from modeling_brillm.graph_building import BigramCounter, build_graph, graph_statistics, heldout_coverage
from modeling_brillm.preparation import model_from_graph

V = 17


def random_batches(seed, batches=5, rows=7, length=9):
    """Token-id batches with right padding (mask 0) of random length, skewed so some pairs repeat a lot."""
    rng = np.random.default_rng(seed)
    for _ in range(batches):
        ids = np.minimum(rng.geometric(0.25, size=(rows, length)) - 1, V - 1)
        lengths = rng.integers(0, length + 1, size=rows)
        mask = np.arange(length)[None, :] < lengths[:, None]
        yield ids, mask


def brute_force_pairs(batches):
    counts = Counter()
    for ids, mask in batches:
        for row, row_mask in zip(ids.tolist(), mask.tolist()):
            for i in range(len(row) - 1):
                if row_mask[i] and row_mask[i + 1]:
                    counts[row[i], row[i + 1]] += 1
    return counts


def brute_force_csr(counts, min_count=1, cap=None):
    row_ptr, col_idx = [0], []
    for u in range(V):
        targets = sorted(
            (v for (s, v), c in counts.items() if s == u and c >= min_count), key=lambda v: (-counts[u, v], v)
        )
        if cap is not None:
            targets = targets[:cap]
        col_idx += sorted(targets)
        row_ptr.append(len(col_idx))
    return row_ptr, col_idx


@pytest.mark.parametrize("dense", [True, False])
@pytest.mark.parametrize("min_count, cap", [(1, None), (2, None), (1, 2), (3, 1)])
def test_graph_equals_brute_force(dense, min_count, cap, monkeypatch):
    monkeypatch.setattr(graph_building, "_SPARSE_CHUNK", 20)  # many sparse merges
    counter = BigramCounter(V, max_dense_bytes=1 << 30 if dense else 0)
    for ids, mask in random_batches(0):
        counter.update(ids, mask)
    expected = brute_force_pairs(random_batches(0))
    keys, counts = counter.result()
    assert counter.is_dense is dense
    assert {(int(k) // V, int(k) % V): int(c) for k, c in zip(keys, counts)} == dict(expected)
    assert counter.num_pairs == sum(expected.values())

    graph = build_graph(counter, min_edge_count=min_count, max_edges_per_source=cap)
    row_ptr, col_idx = brute_force_csr(expected, min_count, cap)
    assert graph.row_ptr.dtype == np.int64 and graph.col_idx.dtype == np.int32
    assert graph.row_ptr.tolist() == row_ptr
    assert graph.col_idx.tolist() == col_idx
    sources = np.repeat(np.arange(V), np.diff(graph.row_ptr))
    assert graph.counts.tolist() == [expected[int(u), int(v)] for u, v in zip(sources, graph.col_idx)]
    assert graph.num_slots == 1 + len(col_idx)
    assert graph.num_distinct == len(expected)


def test_one_dimensional_sequences_and_pairs_agree():
    tokens = np.array([3, 1, 4, 1, 5, 9, 2, 6, 5, 3, 5])
    a, b = BigramCounter(10), BigramCounter(10)
    a.update(tokens)
    b.update_pairs(tokens[:-1], tokens[1:])
    assert [x.tolist() for x in a.result()] == [x.tolist() for x in b.result()]
    assert build_graph(a).owns(np.array([3, 5, 5]), np.array([1, 9, 5])).tolist() == [True, True, False]


def test_large_vocabulary_stays_sparse():
    counter = BigramCounter(32_000)  # a dense int64 count matrix would take 8.2 GB
    assert not counter.is_dense and counter._dense is None
    rng = np.random.default_rng(0)
    ids = rng.integers(0, 32_000, size=(64, 32))
    counter.update(ids)
    graph = build_graph(counter)
    assert graph.row_ptr.shape == (32_001,)
    assert graph.num_own_edges == len({(u, v) for row in ids.tolist() for u, v in zip(row, row[1:])})


def test_heldout_coverage_counts_occurrences_and_distinct_pairs():
    train, valid = BigramCounter(5), BigramCounter(5)
    train.update(np.array([0, 1, 2, 3]))
    valid.update(np.array([0, 1, 2, 0, 1, 4]))  # 0->1 x2, 1->2 owned; 2->0, 1->4 shared
    coverage = heldout_coverage(build_graph(train), valid)
    assert coverage == {
        "bigrams": 5,
        "covered": 3,
        "coverage": 0.6,
        "distinct": 4,
        "distinct_covered": 2,
        "distinct_coverage": 0.5,
    }
    with pytest.raises(ValueError, match="held-out counts are over 6 tokens"):
        heldout_coverage(build_graph(train), BigramCounter(6))


def test_statistics_match_the_model_built_on_the_graph():
    counter = BigramCounter(V)
    for ids, mask in random_batches(1):
        counter.update(ids, mask)
    graph = build_graph(counter)
    stats = graph_statistics(graph, hidden_size=4, max_position_embeddings=16, heldout=counter)
    config = BriLLMConfig(vocab_size=V, hidden_size=4, max_position_embeddings=16, num_slots=graph.num_slots)
    model = model_from_graph(config, graph, seed=0)
    assert stats["num_parameters"] == model.num_parameters()
    assert stats["num_slots"] == graph.num_slots == model.config.num_slots
    assert stats["heldout"]["coverage"] == 1.0
    assert stats["edges_per_source"]["max"] == int(np.diff(graph.row_ptr).max())
    assert stats["fraction_of_dense"] == pytest.approx(stats["num_parameters"] / stats["dense_parameters"])

    # The model's slot map is the graph: owned pairs get slots 1.. in row-major order, the rest slot 0.
    sources, targets = np.divmod(np.arange(V * V), V)
    slots = model.get_edge_graph().slots(torch.from_numpy(sources), torch.from_numpy(targets)).numpy()
    owned = graph.owns(sources, targets)
    assert (slots[~owned] == 0).all()
    assert slots[owned].tolist() == list(range(1, graph.num_slots))
    # Same seed, same initialisation.
    again = model_from_graph(config, graph, seed=0)
    assert torch.equal(model.model.weights, again.model.weights)


def test_graph_and_config_mismatch_are_refused():
    graph = build_graph((np.array([1, 5]), np.array([3, 1])), vocab_size=3)
    with pytest.raises(ValueError, match="the graph has 3 nodes but config.vocab_size=4"):
        model_from_graph(BriLLMConfig(vocab_size=4, hidden_size=2, num_slots=3), graph)
    with pytest.raises(ValueError, match="set num_slots=3"):
        model_from_graph(BriLLMConfig(vocab_size=3, hidden_size=2, num_slots=5), graph)
    with pytest.raises(ValueError, match="strictly increasing"):
        BriLLMForCausalLM.from_graph(
            BriLLMConfig(vocab_size=3, hidden_size=2, num_slots=3), torch.tensor([0, 2, 2, 2]), torch.tensor([1, 1])
        )


def test_bad_ids_and_arguments_are_refused():
    with pytest.raises(ValueError, match=r"token id 7 is outside \[0, vocab_size=5\)"):
        BigramCounter(5).update(np.array([1, 7]))
    with pytest.raises(ValueError, match=r"token id -1"):
        BigramCounter(5).update(np.array([1, -1]))
    with pytest.raises(ValueError, match="min_edge_count must be at least 1"):
        build_graph(BigramCounter(5), min_edge_count=0)
    with pytest.raises(ValueError, match="needs vocab_size"):
        build_graph((np.array([1]), np.array([1])))
    with pytest.raises(ValueError, match="sorted, distinct"):
        build_graph((np.array([3, 1]), np.array([1, 1])), vocab_size=2)
