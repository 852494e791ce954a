"""Building a BriLLM edge graph from a corpus: which edges own a parameter slot.

An edge ``u -> v`` owns a slot when the bigram ``(u, v)`` occurs at least ``min_edge_count`` times (reference: 1)
in the tokenized training corpus; every other edge shares slot 0. Counting is vectorised and streaming: token ids
arrive in batches, each batch's pairs become keys ``u * V + v``, and the keys are accumulated either in one dense
``V * V`` count array (``np.bincount``, when that fits in ``max_dense_bytes``, 1 GB by default: V <= 11,585) or as
sorted sparse ``(key, count)`` arrays merged in large chunks (V = 32,000 and beyond). No Python dict of pairs.

The result is an `EdgeGraph`: the CSR slot map that `BriLLMForCausalLM.from_graph` takes (``row_ptr`` int64
(V+1,), ``col_idx`` int32 sorted within each row), the count of every owned edge, and `graph_statistics` for a
report (slots, parameters, edges per source, held-out bigram coverage).

Example:

```python
>>> import numpy as np
>>> counter = BigramCounter(vocab_size=4)
>>> counter.update(np.array([[0, 1, 2, 1, 2]]))
>>> graph = build_graph(counter)
>>> graph.row_ptr.tolist(), graph.col_idx.tolist(), graph.counts.tolist()
([0, 1, 2, 3, 3], [1, 2, 1], [1, 2, 1])
>>> graph.num_slots  # the shared slot 0 plus three owned edges
4

```
"""

from dataclasses import dataclass

import numpy as np
import torch

from .configuration_brillm import count_parameters
from .graph_brillm import BriLLMEdgeGraph

_SPARSE_CHUNK = 1 << 24  # pending sparse keys merged into the running counts once this many have arrived


class BigramCounter:
    """Streaming bigram counts of token ids, dense (`np.bincount`) or sparse (sorted keys) as memory allows.

    Call `update` with batches of token-id sequences; pairs are taken between neighbours along the last axis,
    and, given an ``attention_mask``, only between two real (mask 1) tokens, so padding and the gap between two
    samples never count. `result` returns the sorted keys ``u * V + v`` of every seen pair and their counts.

    Args:
        vocab_size (`int`): number of token ids ``V``; ids must lie in ``[0, V)``.
        max_dense_bytes (`int`, defaults to 1 GB): largest dense ``V * V`` int64 count array allowed; above it the
            counts are kept sparse.

    Example:

    ```python
    >>> import numpy as np
    >>> counter = BigramCounter(vocab_size=3, max_dense_bytes=0)  # force the sparse path
    >>> counter.update(np.array([[0, 1, 1, 2], [0, 1, 2, 0]]), attention_mask=np.array([[1, 1, 1, 1], [1, 1, 0, 0]]))
    >>> keys, counts = counter.result()
    >>> [(int(k) // 3, int(k) % 3, int(c)) for k, c in zip(keys, counts)]
    [(0, 1, 2), (1, 1, 1), (1, 2, 1)]
    >>> counter.num_pairs, counter.is_dense
    (4, False)

    ```
    """

    def __init__(self, vocab_size, max_dense_bytes=1 << 30):
        if vocab_size < 1:
            raise ValueError(f"vocab_size must be positive; got {vocab_size}.")
        self.vocab_size = vocab_size
        self.num_pairs = 0
        self.is_dense = vocab_size * vocab_size * 8 <= max_dense_bytes
        self._dense = np.zeros(vocab_size * vocab_size, dtype=np.int64) if self.is_dense else None
        self._keys = np.zeros(0, dtype=np.int64)  # sparse: sorted distinct keys so far
        self._counts = np.zeros(0, dtype=np.int64)
        self._pending = []
        self._pending_size = 0

    def update(self, input_ids, attention_mask=None):
        """Count the neighbouring pairs of ``input_ids`` (L,) or (N, L), skipping pairs that touch a masked token."""
        ids = np.asarray(input_ids)
        if ids.ndim == 1:
            ids = ids[None]
        if ids.shape[-1] < 2:
            return
        sources, targets = ids[..., :-1], ids[..., 1:]  # (N, L-1)
        if attention_mask is not None:
            mask = np.asarray(attention_mask).reshape(ids.shape).astype(bool)
            keep = mask[..., :-1] & mask[..., 1:]
            sources, targets = sources[keep], targets[keep]
        self.update_pairs(sources, targets)

    def update_pairs(self, sources, targets):
        """Count the pairs ``sources[i] -> targets[i]`` (two arrays of the same shape)."""
        sources = np.asarray(sources, dtype=np.int64).ravel()
        targets = np.asarray(targets, dtype=np.int64).ravel()
        if sources.size == 0:
            return
        V = self.vocab_size
        low = min(int(sources.min()), int(targets.min()))
        high = max(int(sources.max()), int(targets.max()))
        if low < 0 or high >= V:
            raise ValueError(
                f"token id {low if low < 0 else high} is outside [0, vocab_size={V}): the ids and the vocabulary do not match."
            )
        keys = sources * V + targets
        self.num_pairs += keys.size
        if self.is_dense:
            if keys.size < self._dense.size // 8:  # a small batch: no V * V temporary
                unique, counts = np.unique(keys, return_counts=True)
                self._dense[unique] += counts
            else:
                self._dense += np.bincount(keys, minlength=V * V)
            return
        self._pending.append(keys)
        self._pending_size += keys.size
        if self._pending_size >= _SPARSE_CHUNK:
            self._merge()

    def result(self):
        """``(keys, counts)``: sorted distinct keys ``u * V + v`` of the seen pairs (int64) and their counts (int64)."""
        if self.is_dense:
            keys = np.flatnonzero(self._dense)
            return keys, self._dense[keys]
        self._merge()
        return self._keys, self._counts

    def _merge(self):
        if not self._pending:
            return
        keys = np.concatenate([self._keys, *self._pending])
        counts = np.concatenate([self._counts, np.ones(self._pending_size, dtype=np.int64)])
        order = np.argsort(keys, kind="stable")
        keys, counts = keys[order], counts[order]
        starts = np.flatnonzero(np.concatenate([[True], keys[1:] != keys[:-1]]))
        self._keys, self._counts = keys[starts], np.add.reduceat(counts, starts)
        self._pending, self._pending_size = [], 0


@dataclass
class EdgeGraph:
    """A slot map built from a corpus: the model's CSR type (`BriLLMEdgeGraph`) with the training count of every
    owned edge.

    Source ``u`` owns slots ``1 + row_ptr[u] .. row_ptr[u + 1]`` for its sorted targets
    ``col_idx[row_ptr[u]:row_ptr[u + 1]]`` (the reference's row-major slot order); every other edge uses slot 0.

    Attributes:
        slot_map: the `BriLLMEdgeGraph` (``row_ptr`` (V+1,) int64, ``col_idx`` (E,) int32), as the model holds it.
        counts: (E,) int64 training count of each owned edge.
        num_pairs: bigram occurrences counted to build the graph.
        num_distinct: distinct bigrams seen (before ``min_edge_count`` and the per-source cap).
        min_edge_count: fewest occurrences that gave an edge its own slot.
        max_edges_per_source: per-source cap on owned edges (`None`: no cap).

    Example:

    ```python
    >>> import numpy as np
    >>> graph = build_graph((np.array([1, 4, 5]), np.array([4, 1, 2])), vocab_size=3)
    >>> graph.num_slots, graph.degrees().tolist()
    (4, [1, 2, 0])
    >>> graph.owns(np.array([0, 1, 2]), np.array([1, 2, 2])).tolist()
    [True, True, False]

    ```
    """

    slot_map: BriLLMEdgeGraph
    counts: np.ndarray
    num_pairs: int = 0
    num_distinct: int = 0
    min_edge_count: int = 1
    max_edges_per_source: int | None = None

    @property
    def vocab_size(self):
        return self.slot_map.vocab_size

    @property
    def row_ptr(self):
        """(V+1,) int64 NumPy view of the slot map's offsets."""
        return self.slot_map.row_ptr.numpy()

    @property
    def col_idx(self):
        """(E,) int32 NumPy view of the slot map's owned targets."""
        return self.slot_map.col_idx.numpy()

    @property
    def num_own_edges(self):
        """Number of edges that own a slot."""
        return self.slot_map.num_slots - 1

    @property
    def num_slots(self):
        """Parameter slots ``P`` = shared slot 0 + one per owned edge (the config's ``num_slots``)."""
        return self.slot_map.num_slots

    def degrees(self):
        """Owned out-edges of every node: (V,) int64."""
        return self.slot_map.degrees().numpy()

    def owns(self, sources, targets):
        """Whether each edge ``sources[i] -> targets[i]`` owns a slot (bool array of their shape)."""
        slots = self.slot_map.slots(torch.as_tensor(np.asarray(sources)), torch.as_tensor(np.asarray(targets)))
        return (slots > 0).numpy()

    def num_parameters(self, hidden_size, max_position_embeddings=512):
        """Parameters of a BriLLM on this graph (`count_parameters`)."""
        return count_parameters(self.vocab_size, hidden_size, self.num_slots, max_position_embeddings)


def build_graph(counts, vocab_size=None, min_edge_count=1, max_edges_per_source=None):
    """The slot map of the bigrams counted ``min_edge_count`` times or more, optionally capped per source.

    Args:
        counts: a `BigramCounter`, or ``(keys, counts)`` arrays with sorted distinct keys ``u * V + v`` (then give
            ``vocab_size``).
        vocab_size (`int`, *optional*): ``V``; taken from the counter when not given.
        min_edge_count (`int`, defaults to 1): fewest occurrences for an edge to own a slot (reference: 1, every
            seen bigram).
        max_edges_per_source (`int`, *optional*): keep at most this many owned edges per source, the most frequent
            (ties: lower target id first).

    Returns:
        `EdgeGraph`.

    Example:

    ```python
    >>> import numpy as np
    >>> keys, counts = np.array([0, 1, 2, 4]), np.array([5, 1, 5, 2])  # V = 3: 0->0, 0->1, 0->2, 1->1
    >>> build_graph((keys, counts), vocab_size=3, min_edge_count=2).col_idx.tolist()
    [0, 2, 1]
    >>> build_graph((keys, counts), vocab_size=3, max_edges_per_source=1).col_idx.tolist()
    [0, 1]

    ```
    """
    if isinstance(counts, BigramCounter):
        vocab_size = counts.vocab_size if vocab_size is None else vocab_size
        num_pairs = counts.num_pairs
        keys, counts = counts.result()
    else:
        keys, counts = (np.asarray(array, dtype=np.int64) for array in counts)
        num_pairs = int(counts.sum())
    if vocab_size is None:
        raise ValueError("build_graph needs vocab_size when given (keys, counts) arrays.")
    if min_edge_count < 1:
        raise ValueError(f"min_edge_count must be at least 1 (reference: 1); got {min_edge_count}.")
    if max_edges_per_source is not None and max_edges_per_source < 0:
        raise ValueError(f"max_edges_per_source must be >= 0 or None; got {max_edges_per_source}.")
    if keys.size and (keys[0] < 0 or keys[-1] >= vocab_size * vocab_size or bool((keys[1:] <= keys[:-1]).any())):
        raise ValueError(f"keys must be sorted, distinct and in [0, vocab_size**2 = {vocab_size * vocab_size}).")
    num_distinct = int(keys.size)
    keep = counts >= min_edge_count
    keys, counts = keys[keep], counts[keep]
    if max_edges_per_source is not None:
        sources = keys // vocab_size
        order = np.lexsort((keys, -counts, sources))  # by source, then descending count, then target
        starts = np.searchsorted(sources[order], sources[order], side="left")
        rank = np.arange(order.size) - starts
        kept = np.sort(order[rank < max_edges_per_source])
        keys, counts = keys[kept], counts[kept]
    return EdgeGraph(
        slot_map=BriLLMEdgeGraph.from_edge_keys(keys, vocab_size),
        counts=counts,
        num_pairs=num_pairs,
        num_distinct=num_distinct,
        min_edge_count=min_edge_count,
        max_edges_per_source=max_edges_per_source,
    )


def heldout_coverage(graph, counter):
    """How many held-out bigrams (a `BigramCounter` over validation text) own a slot in ``graph``.

    Returns a dict: ``bigrams`` and ``covered`` occurrences, ``coverage`` (their ratio), and the same for distinct
    bigrams (``distinct``, ``distinct_covered``, ``distinct_coverage``).

    Example:

    ```python
    >>> import numpy as np
    >>> train, valid = BigramCounter(3), BigramCounter(3)
    >>> train.update(np.array([0, 1, 2]))
    >>> valid.update(np.array([0, 1, 0, 1, 1]))
    >>> heldout_coverage(build_graph(train), valid)["coverage"]  # 0->1 twice (owned), 1->0 and 1->1 (shared)
    0.5

    ```
    """
    if counter.vocab_size != graph.vocab_size:
        raise ValueError(
            f"held-out counts are over {counter.vocab_size} tokens but the graph has {graph.vocab_size} nodes."
        )
    keys, counts = counter.result()
    owned = graph.owns(keys // graph.vocab_size, keys % graph.vocab_size)
    total, covered = int(counts.sum()), int(counts[owned].sum())
    return {
        "bigrams": total,
        "covered": covered,
        "coverage": covered / total if total else None,
        "distinct": int(keys.size),
        "distinct_covered": int(owned.sum()),
        "distinct_coverage": float(owned.mean()) if keys.size else None,
    }


def graph_statistics(graph, hidden_size=32, max_position_embeddings=512, heldout=None):
    """A JSON-ready report of ``graph``: slots, parameters (and their share of the dense graph), edges per source,
    the counts behind it, and, given a held-out `BigramCounter`, the coverage of held-out bigrams by owned edges.

    Example:

    ```python
    >>> import numpy as np
    >>> counter = BigramCounter(vocab_size=3)
    >>> counter.update(np.array([0, 1, 2, 1, 2]))
    >>> stats = graph_statistics(build_graph(counter), hidden_size=2)
    >>> stats["num_slots"], stats["num_parameters"], stats["edges_per_source"]["max"]
    (4, 542, 1)

    ```
    """
    V = graph.vocab_size
    degrees = graph.degrees()
    num_parameters = graph.num_parameters(hidden_size, max_position_embeddings)
    dense_parameters = count_parameters(V, hidden_size, 1 + V * V, max_position_embeddings)
    stats = {
        "vocab_size": V,
        "hidden_size": hidden_size,
        "min_edge_count": graph.min_edge_count,
        "max_edges_per_source": graph.max_edges_per_source,
        "train_bigrams": graph.num_pairs,
        "distinct_bigrams": graph.num_distinct,
        "num_own_edges": graph.num_own_edges,
        "num_slots": graph.num_slots,
        "num_parameters": num_parameters,
        "dense_parameters": dense_parameters,
        "fraction_of_dense": num_parameters / dense_parameters,
        "edges_per_source": {
            "min": int(degrees.min()),
            "median": float(np.median(degrees)),
            "mean": float(degrees.mean()),
            "p90": float(np.percentile(degrees, 90)),
            "p99": float(np.percentile(degrees, 99)),
            "max": int(degrees.max()),
            "sources_without_own_edges": int((degrees == 0).sum()),
        },
    }
    if heldout is not None:
        stats["heldout"] = heldout_coverage(graph, heldout)
    return stats


__all__ = ["BigramCounter", "EdgeGraph", "build_graph", "graph_statistics", "heldout_coverage"]
