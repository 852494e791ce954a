"""The in-repo reference path that `benchmarks/bench_speed.py` times our code against computes what our model
computes (so that its ratios compare equal work): the full-vocabulary loss, the sampled training objective and
greedy decoding, including the published decoder's way of listing candidates."""

import sys
from pathlib import Path

import torch
from test_numerics import make_model, random_ids

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "benchmarks"))

from bench_speed import candidates_all, candidates_sampled  # noqa: E402
from reference_path import ReferencePath  # noqa: E402

V = 12


def test_reference_losses_equal_the_model():
    model = make_model(vocab_size=V, seed=30)
    ids = random_ids(3, 9, V, seed=31)
    ref = ReferencePath(model)
    graph = model.get_edge_graph()
    sampled = candidates_sampled(ids[:, :8], graph.row_ptr, graph.col_idx, k=5)
    with torch.no_grad():
        assert abs(float(model(ids, labels=ids).loss) - float(ref.loss(ids, candidates_all(ids, V)))) < 1e-5
        assert abs(float(model.sampled_loss(ids[:, :8], sampled)) - float(ref.loss(ids[:, :8], sampled))) < 1e-5


def test_reference_decoding_equals_greedy_generation():
    model = make_model(vocab_size=V, seed=32, position_shift=0, suppress_self_loop=True).eval()
    ref = ReferencePath(model)
    prompts = random_ids(2, 4, V, seed=33)
    generated = model.generate(prompts, max_new_tokens=10, do_sample=False)[:, 4:].tolist()
    for prompt, tokens in zip(prompts.tolist(), generated):
        assert ref.decode(prompt, 10) == tokens
        # Listing candidates as published only changes which of several equal scores wins.
        published = ref.decode(prompt, 10, published_candidates=True)
        assert len(published) == 10 and all(0 <= t < V for t in published)
        logits = model(torch.tensor([prompt + published[:-1]])).logits[0, len(prompt) - 1 :]
        chosen = logits.gather(1, torch.tensor(published)[:, None])[:, 0]
        masked = logits.scatter(1, torch.tensor([prompt[-1]] + published[:-1])[:, None], float("-inf"))
        assert torch.allclose(chosen, masked.max(1).values, atol=1e-6)  # each published pick is a best score
