"""`LazyAdamW` on BriLLM's sparse gradients against `torch.optim.AdamW` on the dense ones."""

import pytest
import torch
from test_numerics import PARAMS, make_model, max_error, random_ids

from modeling_brillm.optimization import LazyAdamW


def train(sparse, make_optimizer, steps, ids):
    model = make_model(seed=3)
    model.set_sparse_gradients(sparse)
    optimizer = make_optimizer(model.parameters())
    for _ in range(steps):
        optimizer.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        optimizer.step()
    return model


def test_equals_adamw_where_every_step_touches_the_same_rows():
    """Same batch every step, no weight decay: rows the batch never touches stay put under AdamW too."""
    ids = random_ids(2, 8, 11, seed=4)
    expected = train(False, lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.0, foreach=False), 3, ids)
    for chunk_rows in (4096, 3):  # one chunk, and many
        got = train(True, lambda p: LazyAdamW(p, lr=0.05, weight_decay=0.0, chunk_rows=chunk_rows), 3, ids)
        for name in PARAMS:
            assert max_error(getattr(got.model, name), getattr(expected.model, name)) < 1e-6, name


def test_untouched_rows_are_left_alone():
    ids = random_ids(2, 8, 11, seed=5)
    before = make_model(seed=3).model.weights.detach().clone()
    adamw = train(False, lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.1, foreach=False), 1, ids).model
    lazy = train(True, lambda p: LazyAdamW(p, lr=0.05, weight_decay=0.1), 1, ids).model
    touched = torch.zeros(before.shape[0], dtype=torch.bool)
    model = make_model(seed=3)
    model.set_sparse_gradients(True)
    model(ids, labels=ids).loss.backward()
    touched[model.model.weights.grad.coalesce().indices()[0]] = True
    assert 0 < touched.sum() < touched.numel()
    assert max_error(lazy.weights[touched], adamw.weights[touched]) < 1e-6
    assert torch.equal(lazy.weights[~touched], before[~touched])  # AdamW decayed these
    assert max_error(adamw.weights[~touched], before[~touched] * (1 - 0.05 * 0.1)) < 1e-7


def test_accumulated_sparse_gradients_are_coalesced_first():
    """Two backward passes before a step leave repeated rows in the gradient: each row must be updated once."""
    ids = random_ids(2, 8, 11, seed=6)
    results = []
    for sparse, make in ((False, lambda p: torch.optim.AdamW(p, lr=0.05, weight_decay=0.0, foreach=False)),
                         (True, lambda p: LazyAdamW(p, lr=0.05, weight_decay=0.0))):  # fmt: skip
        model = make_model(seed=3)
        model.set_sparse_gradients(sparse)
        optimizer = make(model.parameters())
        for half in (ids[:1], ids[1:]):
            model(half, labels=half).loss.backward()
        optimizer.step()
        results.append(model)
    for name in PARAMS:
        assert max_error(getattr(results[0].model, name), getattr(results[1].model, name)) < 1e-6, name


def test_bad_settings_raise():
    with pytest.raises(ValueError, match="betas in"):
        LazyAdamW([torch.nn.Parameter(torch.zeros(2))], betas=(0.9, 1.0))
