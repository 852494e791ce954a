"""Checks of the Triton kernels against plain references, run by tests/test_kernels.py in a subprocess with
``TRITON_INTERPRET=1`` and ``BRILLM_KERNELS=triton`` (the interpreter must be chosen before triton is imported, so
the pytest process itself never switches). Each check returns a dict of measured numbers, printed as JSON."""

import json
import os
import sys
import time

import torch
import torch.nn.functional as F

from modeling_brillm import BriLLMConfig, BriLLMForCausalLM
from modeling_brillm.kernels_brillm import edge_nll, signal_flow

PARAMS = ("weights", "biases", "node_bias", "positions")


def random_graph(V, density, seed):
    """A ragged CSR graph: each edge owned with probability ``density``, node 0 owns none, node 1 owns all."""
    gen = torch.Generator().manual_seed(seed)
    keep = torch.rand(V, V, generator=gen) < density
    keep[0], keep[1] = False, True
    row_ptr = torch.zeros(V + 1, dtype=torch.long)
    row_ptr[1:] = keep.sum(1).cumsum(0)
    return row_ptr, keep.nonzero()[:, 1].int()


def dense_graph(V):
    return torch.arange(V + 1) * V, torch.arange(V, dtype=torch.int32).repeat(V)


def graph(kind, V, seed):
    return dense_graph(V) if kind == "dense" else random_graph(V, 0.3, seed)


def relative(a, b):
    a = a.to_dense() if a.is_sparse else a
    a, b = a.detach().float(), b.detach().float()
    return float((a - b).abs().max() / b.abs().max().clamp_min(1e-30))


def reference_nll(signal, pe, weights, biases, sources, targets, row_ptr, col_idx):
    """Scores of all V targets with each target's own matrix (slot 0 where shared), then plain cross-entropy."""
    V = row_ptr.numel() - 1
    slot = torch.zeros(V, V, dtype=torch.long)
    rows = torch.repeat_interleave(torch.arange(V), row_ptr[1:] - row_ptr[:-1])
    slot[rows, col_idx.long()] = torch.arange(1, col_idx.numel() + 1)
    slots = slot[sources]  # (N, V)
    z = torch.einsum("ni,nvio->nvo", signal, weights[slots].float()) + biases[slots][:, :, 0].float() + pe[:, None]
    scores = torch.linalg.vector_norm(F.gelu(z), dim=-1)
    return F.cross_entropy(scores, targets, reduction="none"), slots


def check_edge_nll(d, kind, seed=0, V=16, N=24):
    """edge_nll and its four gradients against `reference_nll`, dense and sparse gradient layouts."""
    row_ptr, col_idx = graph(kind, V, seed)
    gen = torch.Generator().manual_seed(seed + 1)
    P = 1 + col_idx.numel()
    weights = (torch.rand(P, d, d, generator=gen) - 0.5).requires_grad_()
    biases = (torch.rand(P, 1, d, generator=gen) - 0.5).requires_grad_()
    sources = torch.randint(0, V, (N,), generator=gen)
    sources[:3], sources[3:5] = 1, 0  # a full row, an empty one
    targets = torch.randint(0, V, (N,), generator=gen)
    signal = torch.randn(N, d, generator=gen).requires_grad_()
    pe = torch.randn(N, d, generator=gen).requires_grad_()
    upstream = torch.rand(N, generator=gen)
    inputs = [signal, pe, weights, biases]
    expected, _ = reference_nll(signal, pe, weights, biases, sources, targets, row_ptr, col_idx)
    expected_grads = torch.autograd.grad((expected * upstream).sum(), inputs)
    result = {}
    for sparse in (False, True):
        nll = edge_nll(signal, pe, weights, biases, sources, targets, row_ptr, col_idx, sparse=sparse)
        grads = torch.autograd.grad((nll * upstream).sum(), inputs)
        name = "sparse" if sparse else "dense"
        result[f"{name}_nll"] = relative(nll, expected)
        for key, grad, want in zip(("signal", "pe", "weights", "biases"), grads, expected_grads):
            result[f"{name}_{key}"] = relative(grad, want)
        if sparse:
            touched = [0] + [s for v in sorted(set(sources.tolist())) for s in range(1 + row_ptr[v], 1 + row_ptr[v + 1])]
            result["sparse_layout_ok"] = bool(
                grads[2].is_coalesced() and grads[2].indices()[0].tolist() == touched and grads[3].is_coalesced()
            )
    return result


def reference_flow(kinds, start, edge_w, edge_b, edge_pe, edge_logit, signal0, numerator0, denominator0, max0):
    """`signal_brillm.flow_reference`'s loop written out: the running softmax, position by position."""
    x, num, den, m = signal0, numerator0, denominator0, max0
    signals, energies = [], []
    for t in range(kinds.shape[1]):
        edge, first = kinds[:, t] == 2, kinds[:, t] == 1
        energy = F.gelu(torch.einsum("bi,bio->bo", x, edge_w[:, t]) + edge_b[:, t] + edge_pe[:, t])
        new_m = torch.where(den > 0, torch.maximum(m, edge_logit[:, t]), edge_logit[:, t]).detach()
        rescale, weight = torch.exp((m - new_m).clamp(max=0)), torch.exp(edge_logit[:, t] - new_m)
        new_num, new_den = num * rescale[:, None] + weight[:, None] * energy, den * rescale + weight
        num = torch.where(edge[:, None], new_num, num)
        den, m = torch.where(edge, new_den, den), torch.where(edge, new_m, m)
        x = torch.where(edge[:, None], num / den.clamp_min(1e-30)[:, None], torch.where(first[:, None], start[:, t], x))
        signals.append(x)
        energies.append(torch.where(edge[:, None], energy, torch.where(first[:, None], start[:, t], 0.0)))
    return torch.stack(signals, 1), torch.stack(energies, 1)


def check_signal_flow(d, B=5, T=9, seed=0):
    """signal_flow against `reference_flow` on texts with left padding, right padding, a running state."""
    gen = torch.Generator().manual_seed(seed)
    present = torch.ones(B, T, dtype=torch.bool)
    present[1, :3] = False  # left padding
    present[2, 6:] = False  # right padding
    present[3, 4] = False  # a hole
    before = torch.cumsum(present.long(), 1) - present.long()
    before[4] += 3  # text 4 continues a running state
    kinds = (present & (before == 0)).int() + 2 * (present & (before > 0)).int()
    tensors = [
        torch.randn(B, T, d, generator=gen),  # start
        torch.rand(B, T, d, d, generator=gen) - 0.5,
        torch.rand(B, T, d, generator=gen) - 0.5,
        torch.randn(B, T, d, generator=gen),
        torch.randn(B, T, generator=gen) * 2,
        torch.zeros(B, d),
    ]
    tensors = [t.requires_grad_() for t in tensors]
    numerator0, denominator0, max0 = torch.zeros(B, d), torch.zeros(B), torch.zeros(B)
    numerator0[4], denominator0[4], max0[4] = torch.randn(d, generator=gen), 1.7, 0.4
    with torch.no_grad():
        tensors[5][4] = numerator0[4] / denominator0[4]
    state = (numerator0, denominator0, max0)
    up_s, up_e = torch.randn(B, T, d, generator=gen), torch.randn(B, T, d, generator=gen)
    s, e = reference_flow(kinds, *tensors, *state)
    want = torch.autograd.grad((s * up_s).sum() + (e * up_e).sum(), tensors)
    ks, ke, _, _ = signal_flow(kinds, *tensors, *state)
    got = torch.autograd.grad((ks * up_s).sum() + (ke * up_e).sum(), tensors)
    result = {"signals": relative(ks, s), "energies": relative(ke, e)}
    names = ("start", "edge_w", "edge_b", "edge_pe", "edge_logit", "signal0")
    result.update({f"grad_{n}": relative(g, w) for n, g, w in zip(names, got, want)})
    return result


def make_model(V, d, kind, seed, dtype=torch.float32):
    row_ptr, col_idx = graph(kind, V, seed)
    torch.manual_seed(seed)
    config = BriLLMConfig(vocab_size=V, hidden_size=d, num_slots=1 + col_idx.numel())
    return BriLLMForCausalLM.from_graph(config, row_ptr, col_idx).to(dtype)


def training_batch(V, B, T, seed, padding):
    gen = torch.Generator().manual_seed(seed)
    ids = torch.randint(0, V, (B, T), generator=gen)
    mask = torch.ones_like(ids)
    if padding:
        mask[1 % B, : T // 3] = 0  # left padding
        mask[2 % B, T - T // 4 :] = 0  # right padding
    return ids.masked_fill(mask == 0, 0), mask, ids.masked_fill(mask == 0, -100)


def step(model, backend, sparse, ids, mask, labels):
    """One training forward + backward on ``backend``: (loss, {parameter: dense gradient})."""
    os.environ["BRILLM_KERNELS"] = backend
    model.set_sparse_gradients(sparse)
    model.zero_grad(set_to_none=True)
    out = model(ids, attention_mask=mask, labels=labels)
    out.loss.backward()
    grads = {n: getattr(model.model, n).grad for n in PARAMS}
    return out, {n: g.to_dense() if g.is_sparse else g for n, g in grads.items()}


def check_training_step(d, kind, padding, sparse, seed=0, V=16, B=3, T=8):
    """One model training step, kernel path against the PyTorch path: loss and every parameter's gradient."""
    model = make_model(V, d, kind, seed)
    batch = training_batch(V, B, T, seed + 1, padding)
    torch_out, want = step(model, "torch", sparse, *batch)
    kernel_out, got = step(model, "triton", sparse, *batch)
    result = {"loss": relative(kernel_out.loss, torch_out.loss), "kernel_logits_none": kernel_out.logits is None}
    result.update({n: relative(got[n], want[n]) for n in PARAMS})
    return result


def check_bf16_training_step(d=16, seed=0, V=16, B=3, T=8):
    """bf16 weights on the kernel path against float32 weights holding the same (bf16-rounded) values."""
    low = make_model(V, d, "sparse", seed, torch.bfloat16)
    high = make_model(V, d, "sparse", seed)
    high.load_state_dict({k: v.float() if v.is_floating_point() else v for k, v in low.state_dict().items()})
    batch = training_batch(V, B, T, seed + 1, True)
    out_low, got = step(low, "triton", False, *batch)
    out_high, want = step(high, "torch", False, *batch)
    result = {"loss": relative(out_low.loss, out_high.loss), "grad_dtype": str(low.model.weights.grad.dtype)}
    result.update({n: relative(got[n], want[n]) for n in PARAMS})
    return result


def check_no_grad_kernel(d=32, seed=0, V=24):
    """The no-grad `_scores_kernel` (eval, generate) against PyTorch scoring, with padding and bf16 weights."""
    from modeling_brillm.scoring_brillm import triton_scores

    os.environ["BRILLM_KERNELS"] = "triton"
    result = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = make_model(V, d, "sparse", seed, dtype).eval()
        ids, mask, _ = training_batch(V, 3, 8, seed + 1, True)
        prompt = ids[:1, :3]
        outputs = {}
        for enabled in (True, False):
            triton_scores.enabled = enabled
            with torch.no_grad():
                logits = model(ids, attention_mask=mask).logits
            generated = model.generate(prompt, max_new_tokens=4, do_sample=False)
            outputs[enabled] = (logits, generated)
        triton_scores.enabled = True
        name = str(dtype).split(".")[-1]
        result[f"{name}_logits"] = relative(outputs[True][0], outputs[False][0])
        result[f"{name}_generate_equal"] = bool(torch.equal(outputs[True][1], outputs[False][1]))
        result["kernel_used"] = triton_scores.usable(torch.zeros(1, d))
    return result


COMPUTE_OPS_SKIPPED = ("view", "as_strided", "select", "slice", "expand", "reshape", "unsqueeze", "squeeze",
                       "permute", "transpose", "t", "alias", "detach", "unbind", "split", "lift_fresh",
                       "_unsafe_view", "empty", "empty_like", "empty_strided", "resolve_conj", "resolve_neg",
                       "contiguous", "to", "_to_copy", "is_nonzero", "item", "_local_scalar_dense", "numpy_T")  # fmt: skip


def count_operators(backend, sources, T, B=2, V=24, d=8, seed=0):
    """Operator calls of one training step, forward + backward, as a GPU would launch them: compute operators (views
    and metadata left out) plus Triton kernel launches; the interpreter's own tensor handling inside a launch is
    not counted. ``sources``: the number of nodes the batch draws its tokens from (few or many)."""
    from torch.profiler import ProfilerActivity, profile, record_function
    from triton.runtime.interpreter import InterpretedFunction

    os.environ["BRILLM_KERNELS"] = backend
    model = make_model(V, d, "sparse", seed)
    gen = torch.Generator().manual_seed(seed + 1)
    ids = torch.randint(0, sources, (B, T), generator=gen)
    model(ids[:, :2], labels=ids[:, :2]).loss.backward()  # warm-up: tables cached once per model
    model.zero_grad(set_to_none=True)
    run = InterpretedFunction.run

    def marked_run(self, *args, **kwargs):
        with record_function("triton_launch"):
            return run(self, *args, **kwargs)

    InterpretedFunction.run = marked_run
    try:
        with profile(activities=[ProfilerActivity.CPU]) as prof:
            model(ids, labels=ids).loss.backward()
    finally:
        InterpretedFunction.run = run
    launches, ops, detail = 0, 0, {}
    for event in prof.events():
        if event.name == "triton_launch":
            launches += 1
            continue
        parent, inside = event.cpu_parent, False
        while parent is not None and not inside:
            inside, parent = parent.name == "triton_launch", parent.cpu_parent
        if not inside and event.name.startswith("aten::") and event.name[6:] not in COMPUTE_OPS_SKIPPED:
            ops += 1
            detail[event.name] = detail.get(event.name, 0) + 1
    distinct = len(set(ids.view(-1).tolist()))
    return {"ops": ops, "launches": launches, "total": ops + launches, "distinct_sources": distinct, "detail": detail}


def time_recurrence(T, B=8, d=32, repeats=1):
    """Seconds of the kernel recurrence's forward + backward on unpadded texts (best of ``repeats``)."""
    gen = torch.Generator().manual_seed(0)
    kinds = torch.full((B, T), 2, dtype=torch.int32)
    kinds[:, 0] = 1
    tensors = [
        torch.randn(B, T, d, generator=gen),
        torch.rand(B, T, d, d, generator=gen) - 0.5,
        torch.rand(B, T, d, generator=gen) - 0.5,
        torch.randn(B, T, d, generator=gen),
        torch.ones(B, T),
        torch.zeros(B, d),
    ]
    tensors = [t.requires_grad_() for t in tensors]
    state = (torch.zeros(B, d), torch.zeros(B), torch.zeros(B))
    best = float("inf")
    for _ in range(repeats):
        begin = time.perf_counter()
        signals, energies, _, _ = signal_flow(kinds, *tensors, *state)
        signals.sum().backward()
        best = min(best, time.perf_counter() - begin)
    return {"seconds": best}


if __name__ == "__main__":  # python kernel_checks.py NAME '{"kwarg": value}' ...
    checks = {name: obj for name, obj in globals().items() if name.startswith(("check_", "count_", "time_"))}
    results = []
    for name, kwargs in zip(sys.argv[1::2], sys.argv[2::2]):
        begin = time.perf_counter()
        results.append(checks[name](**json.loads(kwargs)))
        print(f"{name} {kwargs}: {time.perf_counter() - begin:.1f} s", file=sys.stderr)
    print("RESULTS " + json.dumps(results))
