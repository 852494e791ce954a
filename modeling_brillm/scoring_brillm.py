"""Scoring every target of many positions (SPEC §4): one slab GEMM per source node, and its gradient.

The score of target ``t`` from a position with source ``u``, signal ``x`` and positional row ``pe`` is
``||GELU(x W[slot(u, t)] + b[slot(u, t)] + pe)||``. Every target that ``u`` does not own shares slot 0, so all
of them take one score: a position costs its source's own slots plus one shared evaluation, not V.

`score` is the one dispatch point: `reference_scores` is the plain computation (every target of every position
on its own, as the spec states it); the fast paths group positions by source (`ScoringPlan`) so each slab is read
once per batch — `EdgeScores` (autograd, a single slot gradient per parameter, dense or sparse) and, without
autograd, in-place PyTorch or the Triton kernel on CUDA.
`next_token_loss` is the training loss without logits, by the Triton kernels of ``kernels_brillm``.
This file is a flat sibling of ``modeling_brillm.py`` (remote code): it imports only torch, numpy, its siblings and,
when installed, triton.
"""

import math
import weakref
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F

from .graph_brillm import SlotRows, zeroed_gradient
from .kernels_brillm import edge_nll, kernels_wanted
from .signal_brillm import gelu, sinusoidal_positions

@dataclass
class ScoringPlan:
    """Positions grouped by source node, and where each of their scores goes.

    The kernels lay scores out as (M + N,): the owned scores group by group, each group a (targets, positions)
    block of its source's slab, then the shared-slot score of every position.
    """

    order: torch.Tensor | None  # (N,) positions sorted by source, the kernels' order; None: already in it
    inverse: torch.Tensor | None  # (N,) where each position went in that order
    groups: list  # [(lo, hi, first, count)] per distinct source: slab 1 + lo .. hi, sorted positions first ..
    pair_index: torch.Tensor  # (M,) position * V + target of each owned score, in kernel order
    num_pairs: int  # M


def single_source_plan(graph, source):
    """The plan of one position leaving ``source`` (a host int): one slab, nothing to sort."""
    lo, hi = graph.row(source)
    return ScoringPlan(None, None, [(lo, hi, 0, 1)], graph.targets()[lo:hi], hi - lo)


def plan_scoring(graph, sources):
    """Group positions by their source node (N,): see `ScoringPlan`.

    Sorting happens where the sources are; the index of every owned score is computed on the host with NumPy,
    where its dozen small operations cost a few microseconds each instead of tens.
    """
    if sources.numel() == 1:  # batch-1 generation
        return single_source_plan(graph, int(sources))
    order = torch.argsort(sources, stable=True)
    distinct, counts = torch.unique_consecutive(sources[order], return_counts=True)  # (G,)
    row_ptr, col_idx = graph._host()
    distinct, counts, sorted_positions = distinct.cpu().numpy(), counts.cpu().numpy(), order.cpu().numpy()
    lo, hi = row_ptr[distinct], row_ptr[distinct + 1]
    first = np.cumsum(counts) - counts
    degree = hi - lo
    num_edges, num_pairs = int(degree.sum()), int((degree * counts).sum())
    # A group's block takes its slab's edges in turn, each with the group's sorted positions first .. + count.
    edge = np.arange(num_edges) + np.repeat(lo - (np.cumsum(degree) - degree), degree)  # (E,) in block order
    edge_first = np.repeat(first, degree)  # (E,) the group's first sorted position, per edge
    if num_edges == num_pairs:  # one position per source (generation): each edge meets it once
        position = sorted_positions[edge_first]
    else:
        edge_count = np.repeat(counts, degree)
        pair_start = np.cumsum(edge_count) - edge_count
        offset = np.repeat(edge_first - pair_start, edge_count)
        position = sorted_positions[np.arange(num_pairs) + offset]
        edge = np.repeat(edge, edge_count)
    pair_index = torch.from_numpy(position * graph.vocab_size + col_idx[edge]).to(sources.device)
    groups = list(zip(lo.tolist(), hi.tolist(), first.tolist(), counts.tolist()))
    return ScoringPlan(order, torch.argsort(order), groups, pair_index, num_pairs)


def preactivations(signal, pe, weights, biases, plan):
    """``z = x W + b + pe`` of the plan's owned pairs, then of the shared slot: (M + N, d) in kernel order.

    signal and pe are (N, d) in plan order. Each source's slab is read once, as a view of ``weights``: one batched
    GEMM of all that source's signals, written straight into its block of z.
    """
    N, d = signal.shape
    compute = signal.dtype
    z = signal.new_empty(plan.num_pairs + N, d)
    start = 0
    for lo, hi, first, count in plan.groups:
        if hi == lo:
            continue
        rows, slab = slice(first, first + count), slice(1 + lo, 1 + hi)
        block = z[start : start + (hi - lo) * count].view(hi - lo, count, d)
        x = signal[rows].expand(hi - lo, count, d)
        torch.baddbmm(biases[slab].to(compute), x, weights[slab].to(compute), out=block)
        block += pe[rows]
        start += (hi - lo) * count
    shared = z[start:]
    torch.addmm(biases[0].to(compute), signal, weights[0].to(compute), out=shared)
    shared += pe
    return z


def _write(out, op, *args, **kwargs):
    """``op(*args, **kwargs)`` written into ``out``, a gradient view that may hold a lower precision."""
    if out.dtype == args[0].dtype:
        op(*args, **kwargs, out=out)
    else:
        out.copy_(op(*args, **kwargs))


class SlotGradient(SlotRows):
    """The gradient of ``weights`` or ``biases`` (P, ...) that one backward of `EdgeScores` builds.

    Dense: a full-size tensor, zero except the touched slots. Sparse: a coalesced COO tensor whose values hold only
    slot 0 and the slabs of the plan's sources, in slot order. Either way each slab's gradient is written once,
    into its own view, and `add_rows` lets the recurrence's true-edge gather add its few rows in place.
    """

    def __init__(self, param, plan, sparse):
        self.shape, self.sparse = param.shape, sparse
        slabs = [(lo, hi) for lo, hi, _, _ in plan.groups if hi > lo]
        if not sparse:  # backward overwrites slot 0 and every slab whole: only the other rows need zeros
            self.values = zeroed_gradient(param, written=[(0, 1)] + [(1 + lo, 1 + hi) for lo, hi in slabs])
            return
        slots = [torch.zeros(1, dtype=torch.long)] + [torch.arange(1 + lo, 1 + hi) for lo, hi in slabs]
        self.slots = torch.cat(slots).to(param.device)  # (S,) sorted: groups come in source order
        self.values = param.new_empty(self.slots.numel(), *param.shape[1:])
        sizes = torch.tensor([1] + [hi - lo for lo, hi in slabs])
        self.first_row = dict(zip((lo for lo, _ in slabs), (torch.cumsum(sizes, 0) - sizes)[1:].tolist()))

    def slot_zero(self):
        return self.values[0]

    def slab(self, lo, hi):
        first = self.first_row[lo] if self.sparse else 1 + lo
        return self.values[first : first + hi - lo]



class GradientLink:
    """Lets the recurrence's gather of true-edge slots add into the scoring kernel's slot gradients in place.

    Both read ``weights`` and ``biases``; left to autograd, their two gradients would be summed into a third
    full-size (dense) or concatenated (sparse) tensor. The kernel's backward runs first (the recurrence feeds its
    signals): it leaves its `SlotGradient`s here, tagged with the running backward pass, and the gather's backward
    in that same pass adds its rows into them and returns no gradient of its own. (Autograd hands a parameter its
    gradient only after every branch that reads it has run, so the kernel's tensor is still in flight then.)

    That holds only while one forward's graph feeds the parameter: when a backward runs through two forwards
    (``(loss_a + loss_b).backward()``), autograd may already have summed the first kernel gradient into a new
    tensor. So nothing is left here while another link of the same parameters is alive (its graph not yet freed):
    each gather then returns its own gradient, slower but exact.
    """

    _alive = weakref.WeakSet()  # links whose forward graph still exists

    def __init__(self, sparse, owner):
        self.sparse = sparse
        self.owner = id(owner)  # the parameter both branches read
        self.pending = {}  # "weights" / "biases" -> (backward pass id, SlotGradient)
        GradientLink._alive.add(self)

    def leave(self, name, gradient):
        if any(link is not self and link.owner == self.owner for link in list(GradientLink._alive)):
            return
        self.pending[name] = (torch._C._current_graph_task_id(), gradient)

    def take(self, name):
        task, gradient = self.pending.pop(name, (None, None))
        return gradient if task == torch._C._current_graph_task_id() else None


class EdgeScores(torch.autograd.Function):
    """Scores ``||GELU(x W + b + pe)||`` of the plan's owned pairs and of the shared slot: (M + N,).

    Forward keeps the pre-activations z (M + N, d). Backward recomputes GELU from z, reads each slab once more for
    the signal gradient, and writes each slab's gradient into its own view of one `SlotGradient` (dense, or
    sparse when ``sparse``), never a full-size gradient per slab. ``link`` (optional) is the `GradientLink`
    shared with the recurrence that produced the signals.
    """

    @staticmethod
    def forward(ctx, signal, pe, weights, biases, plan, sparse, link):
        z = preactivations(signal, pe, weights, biases, plan)
        scores = torch.linalg.vector_norm(gelu(z), dim=-1)
        ctx.save_for_backward(signal, z, scores, weights, biases)
        ctx.plan, ctx.sparse, ctx.link = plan, sparse, link
        return scores

    @staticmethod
    def backward(ctx, grad_scores):
        signal, z, scores, weights, biases = ctx.saved_tensors
        plan = ctx.plan
        need_x, _, need_w, need_b, _, _, _ = ctx.needs_input_grad
        d, compute = signal.shape[1], signal.dtype
        y = gelu(z)
        grad_y = y.mul_((grad_scores / scores.clamp_min(torch.finfo(compute).tiny))[:, None])
        grad_z = torch.ops.aten.gelu_backward.grad_input(grad_y, z, grad_input=grad_y)  # (M + N, d), in y's memory
        grad_x = torch.zeros_like(signal) if need_x else None
        grad_w = SlotGradient(weights, plan, ctx.sparse) if need_w else None
        grad_b = SlotGradient(biases, plan, ctx.sparse) if need_b else None
        start = 0
        for lo, hi, first, count in plan.groups:
            if hi == lo:
                continue
            rows, m = slice(first, first + count), hi - lo
            block = grad_z[start : start + m * count].view(m, count, d)
            if need_x:
                grad_x[rows] += torch.matmul(block, weights[1 + lo : 1 + hi].to(compute).transpose(1, 2)).sum(0)
            if need_w:
                _write(grad_w.slab(lo, hi), torch.matmul, signal[rows].t(), block)  # (m, d, d)
            if need_b:
                _write(grad_b.slab(lo, hi), torch.sum, block, 1, keepdim=True)  # (m, 1, d)
            start += m * count
        shared = grad_z[start:]  # (N, d)
        if need_x:
            grad_x.addmm_(shared, weights[0].to(compute).t())
        if need_w:
            _write(grad_w.slot_zero(), torch.matmul, signal.t(), shared)
        if need_b:
            _write(grad_b.slot_zero(), torch.sum, shared, 0, keepdim=True)
        if ctx.link is not None:
            for name, gradient in (("weights", grad_w), ("biases", grad_b)):
                if gradient is not None:
                    ctx.link.leave(name, gradient)
        return (
            grad_x,
            None,
            grad_w.tensor() if need_w else None,
            grad_b.tensor() if need_b else None,
            None,
            None,
            None,
        )


class GatherSlots(torch.autograd.Function):
    """``param[slots]``: the recurrence's true-edge matrices or biases (n, ...).

    Backward adds its rows into the scoring kernel's gradient of the same pass when there is one (see
    `GradientLink`), so ``param`` receives a single gradient; otherwise it returns its own, sparse or dense.
    """

    @staticmethod
    def forward(ctx, param, slots, link, name):
        ctx.save_for_backward(slots)
        ctx.link, ctx.name, ctx.shape = link, name, param.shape
        return param.index_select(0, slots)

    @staticmethod
    def backward(ctx, grad):
        (slots,) = ctx.saved_tensors
        kernel = ctx.link.take(ctx.name)
        if kernel is not None and kernel.add_rows(slots, grad):
            return None, None, None, None
        if ctx.link.sparse:
            return torch.sparse_coo_tensor(slots[None], grad, ctx.shape, check_invariants=False), None, None, None
        return grad.new_zeros(ctx.shape).index_add_(0, slots, grad), None, None, None


def gather_slots(param, slots, link, name):
    """``param[slots]`` (n, ...); through `GatherSlots` when a backward will want its gradient."""
    if link is None:
        return param.index_select(0, slots)
    return GatherSlots.apply(param, slots, link, name)


# ----------------------------------------------------------------------------------------------------------------
# Optional: the same no-grad scoring as one fused GPU kernel (Triton), used only on CUDA when triton is installed

try:  # remote code must import without triton, so it stays optional
    import triton
    import triton.language as tl
except ImportError:
    triton = None

if triton is not None:

    @triton.jit
    def _scores_kernel(
        signal, pe, weights, biases, out, slots, firsts, counts, starts, D: tl.constexpr, BLOCK: tl.constexpr
    ):
        # One program per slab row (one edge matrix, read once): the scores of every position of its group.
        r = tl.program_id(0)
        slot = tl.load(slots + r).to(tl.int64)
        first, count, start = tl.load(firsts + r), tl.load(counts + r), tl.load(starts + r)
        i = tl.arange(0, BLOCK)
        inside = i < D
        square = inside[:, None] & inside[None, :]
        w = tl.load(weights + slot * D * D + i[:, None] * D + i[None, :], mask=square, other=0.0)  # (D, D)
        b = tl.load(biases + slot * D + i, mask=inside, other=0.0).to(tl.float32)
        j = 0
        while j < count:  # (not `range`: the interpreter, TRITON_INTERPRET=1, needs a static bound there)
            x = tl.load(signal + (first + j) * D + i, mask=inside, other=0.0)
            z = tl.sum(x[:, None] * w.to(tl.float32), axis=0) + b
            z += tl.load(pe + (first + j) * D + i, mask=inside, other=0.0)
            y = tl.where(inside, 0.5 * z * (1.0 + tl.math.erf(z * 0.7071067811865476)), 0.0)
            tl.store(out + start + j, tl.sqrt(tl.sum(y * y, axis=0)))
            j += 1


class _TritonScores:
    """The scores (M + N,) of a plan by `_scores_kernel`, for no-grad float32 scoring where `kernels_wanted` (CUDA with
    triton installed, or ``BRILLM_KERNELS=triton``).

    PyTorch (`preactivations`) computes the same everywhere else; ``triton_scores.enabled = False`` turns it off.
    """

    enabled = True

    def available(self):
        return triton is not None and torch.cuda.is_available()

    def usable(self, signal):
        return self.enabled and signal.dtype == torch.float32 and triton is not None and kernels_wanted(signal.device)

    def __call__(self, signal, pe, weights, biases, plan):
        N, d = signal.shape
        device = signal.device
        lo, hi, first, count = torch.tensor(plan.groups, device=device).view(-1, 4).unbind(1)  # (G,) each
        rows = hi - lo  # slab rows per group
        start = torch.cumsum(rows * count, 0) - rows * count  # first score of each group
        group = torch.repeat_interleave(torch.arange(rows.numel(), device=device), rows)  # (R,) group of each row
        k = torch.arange(group.numel(), device=device) - (torch.cumsum(rows, 0) - rows)[group]
        table = torch.stack([1 + lo[group] + k, first[group], count[group], start[group] + k * count[group]])
        shared = torch.tensor([[0], [0], [N], [plan.num_pairs]], device=device)  # slot 0, for every position
        slots, firsts, counts, starts = torch.cat([table, shared], 1).int()  # (R + 1,) each
        out = signal.new_empty(plan.num_pairs + N)
        block = triton.next_power_of_2(d)
        args = (signal.contiguous(), pe.contiguous(), weights.contiguous(), biases.contiguous(), out)
        _scores_kernel[(slots.numel(),)](*args, slots, firsts, counts, starts, D=d, BLOCK=block)
        return out


triton_scores = _TritonScores()


# ----------------------------------------------------------------------------------------------------------------
# The dispatch point


def score(graph, weights, biases, plan, signals, pe, sparse=False, link=None):
    """Full-vocabulary logits (N, V) of N positions grouped by `plan_scoring`: signals and PE rows (N, d), in
    position order. ``sparse`` and ``link`` shape the gradient of ``weights`` and ``biases`` (see `EdgeScores`)."""
    V = graph.vocab_size
    if plan.order is not None:
        signals, pe = signals[plan.order], pe[plan.order]
    if torch.is_grad_enabled() and (signals.requires_grad or weights.requires_grad or biases.requires_grad):
        scores = EdgeScores.apply(signals, pe, weights, biases, plan, sparse, link)
    elif triton_scores.usable(signals):
        scores = triton_scores(signals, pe, weights, biases, plan)
    else:  # nothing to keep: GELU in place
        scores = torch.linalg.vector_norm(gelu(preactivations(signals, pe, weights, biases, plan), inplace=True), dim=-1)
    shared = scores[plan.num_pairs :]  # (N,)
    if plan.order is not None:
        shared = shared[plan.inverse]  # back in position order
    logits = shared[:, None].expand(-1, V).contiguous().view(-1)  # (N * V,)
    return logits.index_put_((plan.pair_index,), scores[: plan.num_pairs]).view(-1, V)


def score_one(graph, weights, biases, source, signal, pe):
    """`score` of one position whose source is a host int, as logits (1, V): batch-1 generation's fast path on the
    CPU, where each tensor operation costs as much as a small slab's arithmetic. The source's slab and the shared
    slot are computed in one (n + 1, d) block, in place. signal and pe (1, d), in the weights' precision."""
    lo, hi = graph.row(source)
    n, d = hi - lo, signal.shape[-1]
    z = signal.new_empty(n + 1, d)
    slab = slice(1 + lo, 1 + hi)
    torch.baddbmm(biases[slab], signal.expand(n, 1, d), weights[slab], out=z[:n].view(n, 1, d))
    torch.addmm(biases[0], signal, weights[0], out=z[n:])
    scores = torch.linalg.vector_norm(gelu(z.add_(pe), inplace=True), dim=-1)  # (n + 1,)
    logits = scores[n:].expand(graph.vocab_size).clone()
    return logits.index_put_((graph.targets()[lo:hi],), scores[:n]).view(1, -1)


def reference_scores(graph, weights, biases, sources, signals, pe):
    """`score` as the spec states it, every target of every position through its own edge: (N, V).

    sources (N,), signals and pe (N, d). Slow (it reads V edge matrices per position): for tests and checks.
    """
    V = graph.vocab_size
    targets = torch.arange(V, device=sources.device)
    rows = []
    for source, x, p in zip(sources, signals, pe):
        slots = graph.slots(source.expand(V), targets)  # (V,)
        y = gelu(torch.einsum("d,vde->ve", x, weights[slots].to(x.dtype)) + biases[slots, 0].to(x.dtype) + p)
        rows.append(torch.linalg.vector_norm(y, dim=-1))
    return torch.stack(rows) if rows else signals.new_zeros(0, V)


def next_token_logits(graph, weights, biases, sources, signals, signal_positions, position_shift, sparse=False, link=None):
    """Full-vocabulary next-token logits (B, T, V) float32 from sources (B, T), signals (B, T, d) and the index of
    each token's out-edge (B, T), -1 at padding (which scores all zeros). The edge leaving position ``i`` uses
    ``PE[i + position_shift]``."""
    B, T = sources.shape
    V, d = graph.vocab_size, signals.shape[-1]
    index = (signal_positions >= 0).reshape(-1).nonzero().squeeze(1)  # unpadded positions (N,)
    if index.numel() == 0:
        return signals.new_zeros(B, T, V, dtype=torch.float32)
    pe_rows = signal_positions.reshape(-1)[index] + position_shift  # (N,) the PE row of each out-edge
    pe = sinusoidal_positions(int(pe_rows.max()) + 1, d, signals.device).to(signals.dtype)[pe_rows]
    sources = sources.reshape(-1)[index]
    logits = score(graph, weights, biases, plan_scoring(graph, sources), signals.reshape(-1, d)[index], pe, sparse, link)
    if index.numel() < B * T:  # padding scores nothing
        logits = logits.new_zeros(B * T, V).index_copy(0, index, logits)
    return logits.view(B, T, V).float()


def kernel_loss_wanted(signals, logits_to_keep, loss_kwargs):
    """Whether a forward with labels takes its loss from `next_token_loss` (and scores no logits): a training step
    (autograd on) on the kernel path, all positions kept and no loss arguments other than ``num_items_in_batch``."""
    plain = logits_to_keep in (0, None) and set(loss_kwargs) <= {"num_items_in_batch"}
    return torch.is_grad_enabled() and plain and kernels_wanted(signals.device)


def next_token_loss(graph, weights, biases, sources, signals, signal_positions, labels, position_shift, past,
                    sparse=False, link=None, num_items_in_batch=None):  # fmt: skip
    """The causal-LM loss of `next_token_logits` (mean cross-entropy of the exact full-vocabulary logits against the
    labels shifted by one, -100 ignored, as ``ForCausalLMLoss``) without any (B, T, V) tensor: `kernels_brillm.edge_nll`.

    sources and labels (B, T), signals (B, T, d), signal_positions (B, T) (-1 at padding: a label after a padded
    position costs log V, as its all-zero logits would), ``past`` columns before this chunk. No host round trip.
    """
    B, T = sources.shape
    V, d = graph.vocab_size, signals.shape[-1]
    next_tokens = F.pad(labels, (0, 1), value=-100)[:, 1:].reshape(-1)  # (B * T,)
    edge_index = signal_positions.reshape(-1)  # (B * T,) index of each token's out-edge in its text, -1 at padding
    valid = next_tokens != -100
    scored = valid & (edge_index >= 0)
    signals = signals.reshape(-1, d)
    table = sinusoidal_positions(past + T + position_shift, d, signals.device).to(signals.dtype)
    pe = table[(edge_index + position_shift).clamp(min=0)]
    sources = torch.where(scored, sources.reshape(-1), -1)  # unscored positions read no slab
    nll = edge_nll(signals, pe, weights, biases, sources, next_tokens.clamp(min=0), graph.row_ptr, graph.col_idx,
                   sparse=sparse, link=link)  # fmt: skip
    total = torch.where(scored, nll, 0.0).sum() + math.log(V) * (valid & ~scored).sum()
    return total / (valid.sum() if num_items_in_batch is None else num_items_in_batch)


__all__ = [
    "EdgeScores",
    "GradientLink",
    "ScoringPlan",
    "SlotGradient",
    "gather_slots",
    "kernel_loss_wanted",
    "next_token_logits",
    "next_token_loss",
    "plan_scoring",
    "reference_scores",
    "score",
    "score_one",
    "single_source_plan",
]
