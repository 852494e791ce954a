"""The reference code's algorithm and costs, re-implemented from SPEC.md, for side-by-side timing.

Not part of the package: `bench_speed.py` times our fast path against this on the same machine, model and
batches. It keeps what makes the reference BriLLM0.5 code slow (SPEC §2, §4, §5, §8):

* the slot map is a Python dict ``{(source, target): slot}``, and every candidate edge is looked up one at a
  time, with ``.item()`` on each element of the index tensors;
* every candidate gathers its own (d, d) matrix and bias by advanced indexing of the Parameter; under autograd the
  backward of each such gather writes a full-size (P, d, d) gradient, once per position;
* the signal is recomputed at each step as an explicit softmax over the positional logits of all earlier energies,
  so a step costs O(context);
* training scores the true target plus 400 negatives (the most frequent successors of the source), evaluation
  scores all V targets, decoding scores all V - 1 targets (the current token excluded) for every new token,
  gathering their V - 1 matrices again each time.

Two differences make this path slightly *faster* than the reference, so ratios against it are conservative:
the dict holds only the owned edges (the reference also stores every shared edge, so its dict has V² entries;
a lookup costs the same), and `decode` visits candidates in id order instead of building "s->t" strings and
shuffling them (which also makes its ties break like ``argmax``, so its tokens can be checked against ours).
``decode(..., published_candidates=True)`` does build them as the published decoder does at every token (an
"s->t" string per other node from a V x V dict of names, shuffled, each parsed back with ``split`` and dict
look-ups): its ties then break at random, so its tokens differ, but its cost per token is the published one.
"""

import random

import torch
import torch.nn.functional as F


class ReferencePath:
    """The reference algorithm on the parameters of a `BriLLMForCausalLM` (read, never modified)."""

    def __init__(self, model):
        base = model.model
        self.weights, self.biases, self.node_bias, self.positions = (
            base.weights,
            base.biases,
            base.node_bias,
            base.positions,
        )
        self.V, self.d = model.config.vocab_size, model.config.hidden_size
        graph = model.get_edge_graph()
        row_ptr, col_idx = graph.row_ptr.tolist(), graph.col_idx.tolist()
        self.slot = {}
        for source in range(self.V):
            for k in range(row_ptr[source], row_ptr[source + 1]):
                self.slot[(source, col_idx[k])] = 1 + k
        self.edge_names = None  # the published decoder's {source name: {target name: (source, target)}}, on demand
        div = 10000.0 ** (torch.arange(0, self.d, 2) / self.d)
        position = torch.arange(0, 512).reshape(-1, 1)
        self.pe = torch.zeros(512, self.d)
        self.pe[:, 0::2] = torch.sin(position * div)
        self.pe[:, 1::2] = torch.cos(position * div)

    def _initial_energy(self, first_tokens):  # (B,) -> (B, 1, d)
        ones = torch.ones(len(first_tokens), 1, self.d) / self.d
        return F.gelu(ones + self.node_bias[first_tokens] + self.pe[0])

    def _slots(self, sources, targets):
        """One dict lookup per element, as the reference does (``.item()`` on each)."""
        pairs = zip(sources.reshape(-1), targets.reshape(-1))
        return torch.tensor([self.slot.get((s.item(), t.item()), 0) for s, t in pairs]).reshape(sources.shape)

    def loss(self, input_ids, candidates):
        """The reference forward: mean over edges of the cross-entropy over ``candidates`` (true one first).

        input_ids (B, L); candidates (B, n, K) for the edges leaving input_ids[:, :n], candidates[..., 0] being the
        true next tokens. Builds the autograd graph when grad mode is on.
        """
        B, n, K = candidates.shape
        loss = 0
        for i in range(n):
            if i == 0:
                energy = self._initial_energy(input_ids[:, 0])  # (B, 1, d)
            else:
                energy = (cache * self.positions[:, :i, :].softmax(1)).sum(1, keepdim=True)
            sources = input_ids[:, i : i + 1].expand(B, K)
            slots = self._slots(sources, candidates[:, i])  # (B, K)
            w = self.weights[slots]  # (B, K, d, d): one gathered matrix per candidate
            b = self.biases[slots]  # (B, K, 1, d)
            x = energy.unsqueeze(1).repeat(1, K, 1, 1).reshape(B * K, 1, self.d)
            y = F.gelu(x.bmm(w.reshape(B * K, self.d, self.d)) + b.reshape(B * K, 1, self.d) + self.pe[i + 1])
            y = y.reshape(B, K, self.d)
            cache = y[:, :1] if i == 0 else torch.cat([cache, y[:, :1]], 1)  # true-edge energies so far
            scores = y.norm(2, -1)  # (B, K)
            loss = loss + F.cross_entropy(scores, torch.zeros(B, dtype=torch.long))
        return loss / n

    def _published_candidates(self, x, rng):
        """The candidates of node x as the published decoder lists them at every token: target ids, shuffled."""
        if self.edge_names is None:
            names = [str(i) for i in range(self.V)]
            self.edge_names = {s: {t: (i, j) for j, t in enumerate(names)} for i, s in enumerate(names)}
        source = str(x)
        edges = ["->".join([source, t]) for t in self.edge_names[source] if t != source]
        rng.shuffle(edges)
        pairs = [self._fetch(edge) for edge in edges]
        return [t for _, t in pairs]

    def _fetch(self, edge):
        s, t = edge.split("->")
        names = self.edge_names
        return names[s][t] if s in names and t in names[s] else names["0"]["0"]

    def decode(self, prompt, max_new_tokens, published_candidates=False):
        """Greedy reference decoding of one prompt (a list of >= 2 token ids): the new token ids.

        Uses PE[i] for edge i (the reference decoder's convention, ``position_shift=0``) and never proposes the
        current token (``suppress_self_loop``). ``published_candidates``: list the candidates as the published
        decoder does (see the module docstring), at its cost, with random tie-breaking.
        """
        rng = random.Random(0)
        with torch.no_grad():
            for i, (s, t) in enumerate(zip(prompt[:-1], prompt[1:])):
                if i == 0:
                    energy = self._initial_energy(torch.tensor([s]))[0]  # (1, d)
                else:
                    energy = (cache * self.positions[:, :i, :].softmax(1)).sum(1)
                slot = self.slot.get((s, t), 0)
                energy = F.gelu(energy.mm(self.weights[slot]) + self.biases[slot] + self.pe[i])
                cache = energy.unsqueeze(0) if i == 0 else torch.cat([cache, energy.unsqueeze(0)], 1)
            x, generated = prompt[-1], []
            for step in range(max_new_tokens):
                position = len(prompt) - 1 + step
                if published_candidates:
                    candidates = self._published_candidates(x, rng)
                else:
                    candidates = [t for t in range(self.V) if t != x]
                slots = torch.tensor([self.slot.get((x, t), 0) for t in candidates])
                w, b = self.weights[slots], self.biases[slots]  # (V - 1, d, d), (V - 1, 1, d)
                energy = (cache * self.positions[:, :position, :].softmax(1)).sum(1, keepdim=True)  # (1, 1, d)
                y = F.gelu(energy.repeat(len(candidates), 1, 1).bmm(w) + b + self.pe[position])  # (V - 1, 1, d)
                scores = y.norm(2, (-2, -1))
                index = torch.softmax(scores, -1).argmax(-1).item()
                x = candidates[index]
                generated.append(x)
                cache = torch.cat([cache, y[index].unsqueeze(0)], 1)
        return generated
