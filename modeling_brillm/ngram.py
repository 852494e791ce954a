"""A Kneser-Ney n-gram baseline on BriLLM's own samples: interpolated modified Kneser-Ney (Chen & Goodman 1999,
as KenLM's ``lmplz`` builds it) over token ids, in numpy, a few seconds for millions of tokens.

**Data.** Packed samples as ``brillm prepare`` writes them (`modeling_brillm.data`): ``input_ids`` (N, L) and
``attention_mask`` (N, L), 1 on real tokens. Every run of real tokens is one sample (with right padding: the real
tokens of a row); n-grams are counted inside samples only, never across samples or over padding, as the neural
models see them. A sample-start symbol ``<s>`` stands before each sample (it is a context, never predicted).
``split.with_format("numpy")[:]`` reads a prepared split's columns as arrays in one go (row by row is ~10x slower).

**Scoring.** The same definition as `modeling_brillm.evaluation.evaluate_nll`: the first token of a sample is not
scored, every later one is predicted from the tokens before it in the sample, at most ``order - 1`` of them (with
``<s>`` in front when fewer precede it), so ``summarize_nll({**sums, "characters": C})`` gives bits/char.

**The model**, for an n-gram order ``n`` and a context ``h`` of ``n - 1`` items::

    p_n(w | h) = (a(h w) - D_n(a(h w))) / A(h) + gamma(h) * p_{n-1}(w | h without its first item)
    gamma(h)   = (D_n1 * N_1(h) + D_n2 * N_2(h) + D_n3+ * N_3+(h)) / A(h),    A(h) = sum_w a(h w)
    p_0(w)     = 1 / V                              (uniform over the V ids: no <unk>, no </s>)

with ``p_n(w | h) = p_{n-1}(w | ...)`` for a context never followed by a token in training (A(h) = 0), ``N_k(h)``
the number of words with ``a(h w) = k`` (3 or more for ``N_3+``), and the adjusted counts ``a``: the raw count for
the highest order and for n-grams that begin with ``<s>``, else the continuation count (the number of distinct
items, tokens or ``<s>``, seen right before the n-gram). Each conditional distribution sums to exactly 1 over the V
ids and gives every id a positive probability. The discounts of each order come from its count-of-counts ``n_k``
(the number of n-grams of adjusted count k): ``Y = n_1 / (n_1 + 2 n_2)``, ``D_k = k - (k + 1) Y n_{k+1} / n_k``;
when one of ``n_1..n_4`` is 0 or a ``D_k`` is not positive (tiny or artificial data), that order uses
`FALLBACK_DISCOUNTS` (0.5, 1, 1.5: KenLM's ``--discount_fallback`` default).

`KneserNeyLM` is the fast path (sorted int64 n-gram keys, ``np.unique`` counting, ``searchsorted`` look-ups);
`reference_distribution` computes the same model in plain Python from the formulas above, for the tests.
"""

from collections import Counter, defaultdict

import numpy as np

ORDERS = range(2, 7)
FALLBACK_DISCOUNTS = (0.5, 1.0, 1.5)  # (D1, D2, D3+), KenLM's --discount_fallback default
_SCORE_ROWS = 1 << 15  # samples scored together (bounds the memory of `score`)
_CACHED_KEYS = 1 << 18  # n-gram tables up to 2 MB of keys: random look-ups are as fast as sorted ones


class KneserNeyLM:
    """Interpolated modified Kneser-Ney n-gram model over token ids 0..V-1 (see the module docstring).

    Example:

    ```python
    >>> import numpy as np
    >>> ids = np.array([[0, 1, 2, 0, 1, 2, 0, 1], [1, 2, 0, 1, 9, 9, 9, 9]])
    >>> mask = np.array([[1] * 8, [1, 1, 1, 1, 0, 0, 0, 0]])  # right padding (the 9s are never read)
    >>> lm = KneserNeyLM.fit(ids, mask, vocab_size=4, order=3)
    >>> p = lm.probabilities([0, 1])  # the next token after the sample start "0 1"
    >>> p.shape, round(float(p.sum()), 12), int(p.argmax()), bool((p > 0).all())
    ((4,), 1.0, 2, True)
    >>> sums = lm.score(ids, mask)  # every real token but the first of each sample
    >>> sums["tokens"], bool(sums["nll"] / sums["tokens"] < np.log(4))  # better than uniform
    (10, True)

    ```
    """

    def __init__(self, vocab_size, order, counts, keys, discounts, totals, gammas):
        self.vocab_size = vocab_size  # V; id V is the sample-start symbol <s>
        self.order = order
        self._counts = counts  # [n] (G_n,) int32 adjusted count of each order-n n-gram (n = 1: of each id, (V,))
        self._keys = keys  # [n] (G_n,) sorted int64 keys context_id * (V + 1) + word of the order-n n-grams (n >= 2)
        self.discounts = discounts  # (order + 1, 4): [n] = (0, D1, D2, D3+) of order n (row 0 unused)
        self._totals = totals  # [n] int32 A(h) of each order-n context h by its (n-1)-gram id (n = 1: (1,))
        self._gammas = gammas  # [n] float64 gamma(h), same layout

    @classmethod
    def fit(cls, input_ids, attention_mask, vocab_size, order):
        """Count the n-grams of packed samples ``input_ids`` / ``attention_mask`` (N, L) (arrays, tensors or nested
        lists; ``attention_mask=None``: every token is real) into a model of ``order`` (2..6) over ``vocab_size``
        ids. Raises `ValueError` for a bad order, an id outside ``0..vocab_size-1`` and data without a real token."""
        _check_model(vocab_size, order)
        stream, dist = _stream(input_ids, attention_mask, vocab_size)  # (S,), (S,)
        if not (dist > 0).any():
            raise ValueError("no real tokens to count an n-gram model on (empty data, or an all-zero attention_mask).")
        base = vocab_size + 1
        ids = stream  # (S,) id of the n-gram of the current order ending at each position (order 1: the item)
        raw, starts_at_bos = np.bincount(stream[dist > 0], minlength=vocab_size), np.zeros(vocab_size, bool)
        keys, counts = [None, None], [None]
        for n in range(2, order + 1):
            at = np.flatnonzero(dist >= n - 1)  # (P,) positions where an n-gram ends
            unique, first, inverse, raw_n = np.unique(
                ids[at - 1].astype(np.int64) * base + stream[at],
                return_index=True,
                return_inverse=True,
                return_counts=True,
            )
            # the (n-1)-grams are done: their continuation count is the number of distinct n-grams ending in them
            # (ids[at[first]]: each n-gram without its first item), unless they begin with <s>
            continuation = np.bincount(ids[at[first]], minlength=len(raw))
            counts.append(np.where(starts_at_bos, raw, continuation).astype(np.int32))
            keys.append(unique)
            raw, starts_at_bos = raw_n, dist[at[first]] == n - 1
            ids = np.full(len(stream), -1, np.int32)
            ids[at] = inverse
        counts.append(raw.astype(np.int32))  # the highest order keeps its raw counts
        discounts = np.zeros((order + 1, 4))
        totals, gammas = [None], [None]
        for n in range(1, order + 1):
            discounts[n, 1:] = modified_kn_discounts(counts[n])
            contexts = np.zeros(len(counts[n]), np.int64) if n == 1 else keys[n] // base
            num_contexts = 1 if n == 1 else base if n == 2 else len(keys[n - 1])
            total = np.bincount(contexts, weights=counts[n], minlength=num_contexts)
            mass = np.bincount(contexts, weights=discounts[n][np.minimum(counts[n], 3)], minlength=num_contexts)
            totals.append(total.astype(np.int32))
            gammas.append(np.divide(mass, total, out=np.zeros(num_contexts), where=total > 0))
        return cls(vocab_size, order, counts, keys, discounts, totals, gammas)

    @property
    def num_ngrams(self):
        """Distinct n-grams seen per order 1..order (order 1: the ids seen)."""
        return [int((self._counts[1] > 0).sum())] + [len(keys) for keys in self._keys[2:]]

    def score(self, input_ids, attention_mask=None):
        """Sums over packed samples (N, L): ``{"nll": nats, "tokens": scored tokens}``, every real token but the
        first of each sample predicted from at most ``order - 1`` tokens before it in the sample."""
        input_ids = np.asarray(input_ids)
        mask = np.ones(input_ids.shape, bool) if attention_mask is None else np.asarray(attention_mask)
        nll, tokens = 0.0, 0
        for begin in range(0, len(input_ids), _SCORE_ROWS):
            rows = slice(begin, begin + _SCORE_ROWS)
            stream, dist = _stream(input_ids[rows], mask[rows], self.vocab_size)
            ids = self._ngram_ids(stream, dist, self.order)
            scored = np.flatnonzero(dist >= 2)  # (M,)
            contexts = [None, np.zeros(len(scored), np.int64)] + [
                ids[n - 1][scored - 1] for n in range(2, self.order + 1)
            ]
            probability = self._probability(contexts, [None] + [ids[n][scored] for n in range(1, self.order + 1)])
            nll += float(-np.log(probability).sum())
            tokens += len(scored)
        return {"nll": nll, "tokens": tokens}

    def probabilities(self, context):
        """(V,) float64: the distribution of the next token of a sample whose tokens so far are ``context`` (a
        sequence of ids; only the last ``order - 1`` count, and a shorter one is the start of a sample)."""
        sample = np.append(np.asarray(context, dtype=np.int64), 0)  # + a placeholder for the next token
        stream, dist = _stream(sample.reshape(1, -1), None, self.vocab_size)
        ids = self._ngram_ids(stream[:-1], dist[:-1], self.order - 1)
        words = np.arange(self.vocab_size)
        contexts = [None, np.zeros(self.vocab_size, np.int64)]
        contexts += [np.full(self.vocab_size, ids[n - 1][-1], np.int64) for n in range(2, self.order + 1)]
        ngrams = [None, words] + [self._find(n, contexts[n], words) for n in range(2, self.order + 1)]
        return self._probability(contexts, ngrams)

    def _ngram_ids(self, stream, dist, top):
        """[n] (S,) id in the training tables of the order-n n-gram ending at each position, for n = 1..top
        (n = 1: the item itself); -1 where no n-gram ends there or it was never seen."""
        ids = [None, stream]
        for n in range(2, top + 1):
            found = np.full(len(stream), -1, np.int64)
            at = np.flatnonzero(dist >= n - 1)
            found[at] = self._find(n, ids[n - 1][at - 1], stream[at])
            ids.append(found)
        return ids

    def _find(self, n, contexts, words):
        """(M,) id of the order-n n-grams (context id, word), -1 if never seen or the context id is -1."""
        found = np.full(len(words), -1, np.int64)
        known = np.flatnonzero(contexts >= 0)
        index, hit = _lookup(self._keys[n], contexts[known] * (self.vocab_size + 1) + words[known])
        found[known[hit]] = index[hit]
        return found

    def _probability(self, contexts, ngrams):
        """(M,) p(word | context) from the order-1 distribution up, interpolated at each seen context; ``contexts[n]``
        and ``ngrams[n]`` (M,) are the ids of the order-n context and n-gram (-1: unseen; n = 1: 0 and the word)."""
        probability = np.full(len(ngrams[1]), 1.0 / self.vocab_size)  # order 0: uniform
        for n in range(1, self.order + 1):
            live = np.flatnonzero(contexts[n] >= 0)
            live = live[self._totals[n][contexts[n][live]] > 0]  # a context never followed in training passes through
            context, ngram = contexts[n][live], ngrams[n][live]
            count = np.where(ngram >= 0, self._counts[n][ngram], 0)
            discounted = (count - self.discounts[n][np.minimum(count, 3)]) / self._totals[n][context]
            probability[live] = discounted + self._gammas[n][context] * probability[live]
        return probability


def modified_kn_discounts(counts):
    """(D1, D2, D3+) from the count-of-counts of adjusted counts ``counts`` (Chen & Goodman, eq. 26), or
    `FALLBACK_DISCOUNTS` where they are degenerate (a count-of-counts n_1..n_4 of 0, or a discount not positive).

    Example:

    ```python
    >>> modified_kn_discounts(np.array([1] * 8 + [2] * 4 + [3] * 2 + [4]))  # n_k = 8, 4, 2, 1: Y = 1/2
    (0.5, 1.25, 2.0)
    >>> modified_kn_discounts(np.array([1, 1, 2]))  # no n-gram of count 3 or 4
    (0.5, 1.0, 1.5)

    ```
    """
    n = np.bincount(counts[counts > 0], minlength=5)[:5].astype(np.float64)  # n[k]: n-grams of adjusted count k
    if (n[1:] == 0).any():
        return FALLBACK_DISCOUNTS
    y = n[1] / (n[1] + 2 * n[2])
    discounts = tuple(float(k - (k + 1) * y * n[k + 1] / n[k]) for k in (1, 2, 3))
    return discounts if min(discounts) > 0 else FALLBACK_DISCOUNTS


def _check_model(vocab_size, order):
    if isinstance(order, bool) or not isinstance(order, (int, np.integer)) or order not in ORDERS:
        raise ValueError(f"order must be an integer from {ORDERS.start} to {ORDERS.stop - 1}; got {order!r}.")
    if isinstance(vocab_size, bool) or not isinstance(vocab_size, (int, np.integer)) or vocab_size < 1:
        raise ValueError(f"vocab_size must be a positive integer; got {vocab_size!r}.")


def _stream(input_ids, attention_mask, vocab_size):
    """The samples (runs of real tokens) of ``input_ids`` (N, L), each after a sample-start symbol (id
    ``vocab_size``), as one stream: (S,) ids and (S,) distance of each item from its sample's start symbol."""
    ids = np.asarray(input_ids)
    if ids.ndim != 2:
        raise ValueError(f"input_ids must be 2-dimensional (samples, tokens); got shape {ids.shape}.")
    mask = np.ones(ids.shape, bool) if attention_mask is None else np.asarray(attention_mask).astype(bool)
    if mask.shape != ids.shape:
        raise ValueError(f"attention_mask has shape {mask.shape}, input_ids {ids.shape}: they must match.")
    tokens = ids[mask].astype(np.int64)  # (T,)
    if tokens.size and (tokens.min() < 0 or tokens.max() >= vocab_size):
        bad = tokens.min() if tokens.min() < 0 else tokens.max()
        raise ValueError(f"token id {bad} is outside 0..{vocab_size - 1}: vocab_size must exceed every real token id.")
    starts = mask.copy()
    starts[:, 1:] &= ~mask[:, :-1]  # (N, L) the first token of each run of real tokens
    starts = starts[mask]  # (T,)
    sample = np.cumsum(starts) - 1  # (T,) the sample of each token
    first = np.flatnonzero(starts)  # (R,) its first token
    position = np.arange(len(tokens)) + sample + 1  # where each token lands behind the start symbols
    stream = np.full(len(tokens) + len(first), vocab_size, np.int64)
    stream[position] = tokens
    dist = np.zeros(len(stream), np.int8)  # only distances up to the highest order (6) matter
    dist[position] = np.minimum(np.arange(len(tokens)) - first[sample] + 1, 127)
    return stream, dist


def _lookup(sorted_keys, keys):
    """(index, found) of ``keys`` in ``sorted_keys`` (index is meaningless where not found). In a table larger than
    the caches the keys are looked up in sorted order: several times faster (the binary searches stay in cache)."""
    if not len(sorted_keys):  # an order longer than every training sample
        return np.zeros(len(keys), np.int64), np.zeros(len(keys), bool)
    if len(sorted_keys) < _CACHED_KEYS:
        index = np.searchsorted(sorted_keys, keys)
    else:
        order = np.argsort(keys)
        index = np.empty(len(keys), np.int64)
        index[order] = np.searchsorted(sorted_keys, keys[order])
    np.minimum(index, len(sorted_keys) - 1, out=index)
    return index, sorted_keys[index] == keys


def reference_distribution(samples, vocab_size, order, context):
    """The model of `KneserNeyLM` in plain Python, straight from the formulas of the module docstring (slow; for
    the tests): ``[p(w | context) for w in range(vocab_size)]`` after counting ``samples`` (lists of token ids).

    Example:

    ```python
    >>> samples = [[0, 1, 2, 0, 1, 2, 0, 1], [1, 2, 0, 1]]
    >>> p = reference_distribution(samples, 4, 3, [0, 1])
    >>> len(p), round(sum(p), 12), max(range(4), key=p.__getitem__)
    (4, 1.0, 2)

    ```
    """
    start = "<s>"
    raw = [Counter() for _ in range(order + 1)]  # raw[n][gram]: occurrences of the n-gram (a tuple of n items)
    for sample in samples:
        items = (start, *sample)
        for end in range(1, len(items)):
            for n in range(1, min(order, end + 1) + 1):
                raw[n][items[end - n + 1 : end + 1]] += 1
    left = defaultdict(set)  # n-gram -> the distinct items seen right before it
    for n in range(2, order + 1):
        for gram in raw[n]:
            left[gram[1:]].add(gram[0])
    adjusted = [{} for _ in range(order + 1)]
    for n in range(1, order + 1):
        for gram, count in raw[n].items():
            adjusted[n][gram] = count if n == order or gram[0] == start else len(left[gram])
    discounts = [None] + [
        modified_kn_discounts(np.array(list(adjusted[n].values()), np.int64)) for n in range(1, order + 1)
    ]
    followers = [defaultdict(dict) for _ in range(order + 1)]  # followers[n][h][w] = a(h w)
    for n in range(1, order + 1):
        for gram, count in adjusted[n].items():
            followers[n][gram[:-1]][gram[-1]] = count

    def discount(n, count):
        return 0.0 if count == 0 else discounts[n][min(count, 3) - 1]

    def probability(n, history, word):
        if n == 0:
            return 1.0 / vocab_size
        lower = probability(n - 1, history[1:], word)
        seen = followers[n].get(history, {})
        total = sum(seen.values())
        if total == 0:
            return lower
        gamma = sum(discount(n, count) for count in seen.values()) / total
        count = seen.get(word, 0)
        return (count - discount(n, count)) / total + gamma * lower

    items = (start, *context)
    top = min(order, len(items) + 1)
    history = items[len(items) - (top - 1) :]
    return [probability(top, history, word) for word in range(vocab_size)]
