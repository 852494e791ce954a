"""Triton kernels for BriLLM training: the grouped edge scoring with its exact full-vocabulary loss, and the signal
recurrence, forward and backward, each in a fixed number of launches per step whatever the batch holds.

A flat sibling of ``modeling_brillm.py`` (copied next to the weights as remote code): it imports only torch, its sibling ``graph_brillm`` and,
when installed, triton; without triton it imports fine and `kernels_wanted` answers False (or explains).

Functional API (all tensors on one device; N scored positions, d width, P slots, V nodes, B texts, T length):

- `scoring_plan` (sources (N,), row_ptr (V+1,)) groups positions by source with torch operations only: no host
  round trip, so a step never waits for the device.
- `edge_nll` (signal (N, d), pe (N, d), weights (P, d, d), biases (P, 1, d), sources (N,), targets (N,), row_ptr,
  col_idx) is the exact next-token negative log-likelihood (N,) over the whole vocabulary (SPEC 4: log-sum-exp of
  the own scores and ``log(V - n_own) + shared score``), differentiable in signal, pe, weights and biases. No
  (N, V) tensor exists on this path. Weight gradients are dense (P, ...) or, with ``sparse=True``, a coalesced
  sparse COO tensor over slot 0 and the touched sources' slabs, the model's layout (its size, the number of
  touched slots, is the one value the host reads, in backward, and only for sparse gradients).
  Launches: one forward kernel, one backward kernel, a grid of (min(N, V + 1) groups, 4 row splits).
- `signal_flow` (kinds, start, edge_w, edge_b, edge_pe, edge_logit (B, T, ...), and the state before the chunk)
  is the whole recurrence of a chunk, padding and a running state included: signals and energies (B, T, d), one
  program per text looping over T in forward and in backward (linear in T).

`BRILLM_KERNELS=triton` forces these kernels on any device (on a CPU under ``TRITON_INTERPRET=1``, which must be
set before triton is imported), ``=torch`` forces PyTorch, unset means Triton on CUDA when triton is installed.

Example (PyTorch fallback answers the same question; the kernels need ``BRILLM_KERNELS=triton`` on a CPU):

```python
>>> import torch
>>> from modeling_brillm.kernels_brillm import kernels_wanted
>>> kernels_wanted(torch.device("cpu")) in (True, False)
True

```
"""

import os

import torch

from .graph_brillm import SlotRows, zeroed_gradient

try:  # remote code must import without triton
    import triton
    import triton.language as tl
except ImportError:
    triton = None

_SPLITS = 4  # programs that share one group's slab rows (row k goes to split k % _SPLITS)
_BLOCK_P = 16  # positions per tile (tl.dot needs at least 16)


def kernels_wanted(device):
    """Whether the Triton kernels serve tensors on ``device``, from ``BRILLM_KERNELS`` (read at each call).

    ``triton`` forces them (an error when they cannot run), ``torch`` forces PyTorch, unset or ``auto``: CUDA with
    triton installed.
    """
    choice = os.environ.get("BRILLM_KERNELS", "auto").strip().lower() or "auto"
    if choice == "torch":
        return False
    if choice == "triton":
        if triton is None:
            raise RuntimeError("BRILLM_KERNELS=triton but triton is not installed: pip install triton==3.9.0")
        if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
            raise RuntimeError(
                f"BRILLM_KERNELS=triton on a {device.type} device needs TRITON_INTERPRET=1 set before triton is imported."
            )
        return True
    if choice != "auto":
        raise ValueError(f"BRILLM_KERNELS must be 'triton', 'torch' or 'auto'; got {choice!r}.")
    return triton is not None and device.type == "cuda"


# ----------------------------------------------------------------------------------------------------------------
# The scoring plan, on the device


class ScoringPlan:
    """Positions grouped by source, as tensors padded to N groups (a batch has at most N distinct sources).

    Attributes: ``order`` (N,) positions sorted by source; per group g (N,): ``first`` (its first sorted position),
    ``count`` (positions, 0 for padding groups), ``lo`` (its slab is slots ``1 + lo .. lo + degree``), ``degree``
    (owned out-edges, 0 for padding groups), ``row_start`` (the group's first row among all touched slab rows);
    ``degree_of`` (N,) the out-degree of each position's source, ``rows`` (1,) the number of touched slab rows.
    A negative source marks a position without a score (padding): it reads no slab.
    """

    def __init__(self, sources, row_ptr):
        N = sources.numel()
        device = sources.device
        scored = sources >= 0  # a negative source marks a position that needs no score (padding)
        sources = sources.long().clamp(min=0)
        marked = torch.where(scored, sources, -1)  # unscored positions form their own group
        self.order = torch.argsort(marked, stable=True)  # (N,)
        sorted_sources = marked[self.order]
        starts = torch.ones(N, dtype=torch.bool, device=device)
        starts[1:] = sorted_sources[1:] != sorted_sources[:-1]
        group = torch.cumsum(starts, 0) - 1  # (N,) group of each sorted position
        rank = torch.arange(N, device=device)
        self.count = torch.zeros(N, dtype=torch.long, device=device).scatter_add_(0, group, torch.ones_like(group))
        self.first = torch.full((N,), N, dtype=torch.long, device=device).scatter_reduce_(0, group, rank, "amin")
        source = torch.zeros(N, dtype=torch.long, device=device).scatter_(0, group, sorted_sources.clamp(min=0))
        group_scored = torch.zeros(N, dtype=torch.bool, device=device).scatter_(0, group, sorted_sources >= 0)
        self.lo = row_ptr[source]
        self.degree = (row_ptr[source + 1] - self.lo) * group_scored  # 0 for padding groups
        self.row_start = torch.cumsum(self.degree, 0) - self.degree
        self.rows = self.degree.sum().view(1)
        self.degree_of = (row_ptr[sources + 1] - row_ptr[sources]) * scored

    def touched_slots(self):
        """Slot 0 then the touched slabs, in slot order: (1 + rows,). Reads ``rows`` on the host (sizes a tensor)."""
        rows = int(self.rows)
        r = torch.arange(rows, device=self.lo.device)
        group = torch.searchsorted(self.row_start, r, right=True) - 1
        slots = 1 + self.lo[group] + r - self.row_start[group]
        return torch.cat([slots.new_zeros(1), slots])


def scoring_plan(sources, row_ptr):
    """The `ScoringPlan` of positions leaving ``sources`` (N,) in the graph ``row_ptr`` (V+1,)."""
    return ScoringPlan(sources, row_ptr)


class SlotGradient(SlotRows):
    """The gradient of ``weights`` or ``biases`` (P, ...) written by the backward kernel: dense (P, ...) or sparse
    over slot 0 and the plan's touched slabs. ``add_rows`` lets the recurrence's true-edge gather add its rows in
    place (the protocol of the model's gradient link)."""

    def __init__(self, param, plan, sparse):
        self.shape, self.sparse, self.plan = param.shape, sparse, plan
        if sparse:
            self.slots = plan.touched_slots()  # (S,)
            self.values = param.new_zeros(self.slots.numel(), *param.shape[1:])
            self.destination = 1 + plan.row_start  # (N,) values row of each group's first slab row
        else:
            self.values = zeroed_gradient(param)
            self.destination = 1 + plan.lo



# ----------------------------------------------------------------------------------------------------------------
# Kernels

if triton is not None:

    @triton.jit
    def _gelu_and_slope(z):
        """Exact GELU of z and its derivative."""
        cdf = 0.5 * (1.0 + tl.math.erf(z * 0.7071067811865476))
        return z * cdf, cdf + z * 0.3989422804014327 * tl.exp(-0.5 * z * z)

    @triton.jit
    def _position_tile(order, first, c, count, signal, pe, i, inside, D: tl.constexpr, BP: tl.constexpr):
        """Positions ``c .. c + BP`` of a group (sorted order from ``first``): their ids, masks, row offsets, and
        signals and PE rows as fp32 (BP, BD) tiles."""
        j = c + tl.arange(0, BP)
        live = j < count
        p = tl.load(order + first + j, mask=live, other=0)
        tile = live[:, None] & inside[None, :]
        offsets = p[:, None] * D + i[None, :]
        x = tl.load(signal + offsets, mask=tile, other=0.0).to(tl.float32)
        e = tl.load(pe + offsets, mask=tile, other=0.0).to(tl.float32)
        return p, live, tile, offsets, x, e

    @triton.jit
    def _energy_tile(x, pe, weights, biases, slot, i, square, inside, D: tl.constexpr):
        """GELU(x W[slot] + b[slot] + pe) of a tile of positions: x, pe (BP, BD) fp32 -> (BP, BD), and W (BD, BD)."""
        w = tl.load(weights + slot * D * D + i[:, None] * D + i[None, :], mask=square, other=0.0).to(tl.float32)
        b = tl.load(biases + slot * D + i, mask=inside, other=0.0).to(tl.float32)
        z = tl.dot(x, w, input_precision="ieee") + b[None, :] + pe
        return z, w

    @triton.jit
    def _loss_forward_kernel(
        signal, pe, weights, biases, targets, col_idx, order, firsts, counts, los, degrees,
        part_max, part_sum, own_score, own_hit, shared_score,
        SPLITS: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BP: tl.constexpr,
    ):  # fmt: skip
        # Program (group g, split): the slab rows k = split, split + SPLITS, ... of g's source, each read once per
        # tile of BP positions; per position a running log-sum-exp of its scores on those rows.
        g, split = tl.program_id(0), tl.program_id(1)
        first, count = tl.load(firsts + g), tl.load(counts + g)
        lo, degree = tl.load(los + g), tl.load(degrees + g)
        i = tl.arange(0, BD)
        inside = i < D
        square = inside[:, None] & inside[None, :]
        c = 0
        while c < count:  # (`while`, not `range`: the interpreter needs static `range` bounds)
            p, live, tile, offsets, x, e = _position_tile(order, first, c, count, signal, pe, i, inside, D, BP)
            target = tl.load(targets + p, mask=live, other=-1)
            run_max = tl.full((BP,), float("-inf"), tl.float32)
            run_sum = tl.zeros((BP,), tl.float32)
            k = split
            while k < degree:
                z, w = _energy_tile(x, e, weights, biases, 1 + lo + k, i, square, inside, D)
                y, _ = _gelu_and_slope(z)
                y = tl.where(tile, y, 0.0)
                s = tl.sqrt(tl.sum(y * y, axis=1))  # (BP,)
                new_max = tl.maximum(run_max, s)
                run_sum = run_sum * tl.exp(run_max - new_max) + tl.exp(s - new_max)
                run_max = new_max
                hit = live & (target == tl.load(col_idx + lo + k))
                tl.store(own_score + p, s, mask=hit)
                tl.store(own_hit + p, 1, mask=hit)
                k += SPLITS
            tl.store(part_max + p * SPLITS + split, run_max, mask=live)
            tl.store(part_sum + p * SPLITS + split, run_sum, mask=live)
            if split == 0:  # the shared slot, once per position
                z, w = _energy_tile(x, e, weights, biases, 0, i, square, inside, D)
                y, _ = _gelu_and_slope(z)
                y = tl.where(tile, y, 0.0)
                tl.store(shared_score + p, tl.sqrt(tl.sum(y * y, axis=1)), mask=live)
            c += BP

    @triton.jit
    def _loss_backward_kernel(
        signal, pe, weights, biases, targets, col_idx, order, firsts, counts, los, degrees, destinations,
        grad_nll, log_z, shared_prob, grad_w, grad_b, grad_x_part, grad_pe_part, grad_shared_z,
        N, SPLITS: tl.constexpr, D: tl.constexpr, BD: tl.constexpr, BP: tl.constexpr,
    ):  # fmt: skip
        # Program (group g, split): for each of its slab rows, dW and db summed over all of g's positions in
        # registers and written once (no atomics); dsignal and dpe into this split's own partial rows.
        g, split = tl.program_id(0), tl.program_id(1)
        first, count = tl.load(firsts + g), tl.load(counts + g)
        lo, degree, destination = tl.load(los + g), tl.load(degrees + g), tl.load(destinations + g)
        i = tl.arange(0, BD)
        inside = i < D
        square = inside[:, None] & inside[None, :]
        part = split * N * D
        if split == 0:  # the shared slot: its pre-activation gradient per position (reduced by torch)
            c = 0
            while c < count:
                p, live, tile, offsets, x, e = _position_tile(order, first, c, count, signal, pe, i, inside, D, BP)
                z, w = _energy_tile(x, e, weights, biases, 0, i, square, inside, D)
                y, slope = _gelu_and_slope(z)
                y = tl.where(tile, y, 0.0)
                s = tl.sqrt(tl.sum(y * y, axis=1))
                ds = tl.load(grad_nll + p, mask=live, other=0.0) * tl.load(shared_prob + p, mask=live, other=0.0)
                dz = tl.where(tile, y * (ds / tl.maximum(s, 1.1754943508222875e-38))[:, None] * slope, 0.0)
                tl.store(grad_shared_z + offsets, dz, mask=tile)
                dx = tl.dot(dz, tl.trans(w), input_precision="ieee")
                tl.store(grad_x_part + part + offsets, tl.load(grad_x_part + part + offsets, mask=tile) + dx, mask=tile)
                c += BP
        k = split
        while k < degree:
            slot = 1 + lo + k
            column = tl.load(col_idx + lo + k)
            acc_w = tl.zeros((BD, BD), tl.float32)
            acc_b = tl.zeros((BD,), tl.float32)
            c = 0
            while c < count:
                p, live, tile, offsets, x, e = _position_tile(order, first, c, count, signal, pe, i, inside, D, BP)
                z, w = _energy_tile(x, e, weights, biases, slot, i, square, inside, D)
                y, slope = _gelu_and_slope(z)
                y = tl.where(tile, y, 0.0)
                s = tl.sqrt(tl.sum(y * y, axis=1))
                prob = tl.exp(s - tl.load(log_z + p, mask=live, other=0.0))
                is_target = tl.load(targets + p, mask=live, other=-1) == column
                ds = tl.load(grad_nll + p, mask=live, other=0.0) * (prob - is_target.to(tl.float32))
                dz = tl.where(tile, y * (ds / tl.maximum(s, 1.1754943508222875e-38))[:, None] * slope, 0.0)
                acc_w += tl.dot(tl.trans(x), dz, input_precision="ieee")
                acc_b += tl.sum(dz, axis=0)
                dx = tl.dot(dz, tl.trans(w), input_precision="ieee")
                tl.store(grad_x_part + part + offsets, tl.load(grad_x_part + part + offsets, mask=tile) + dx, mask=tile)
                tl.store(grad_pe_part + part + offsets, tl.load(grad_pe_part + part + offsets, mask=tile) + dz, mask=tile)
                c += BP
            row = destination + k
            tl.store(grad_w + row * D * D + i[:, None] * D + i[None, :], acc_w.to(grad_w.dtype.element_ty), mask=square)
            tl.store(grad_b + row * D + i, acc_b.to(grad_b.dtype.element_ty), mask=inside)
            k += SPLITS

    @triton.jit
    def _flow_forward_kernel(
        kinds, start, edge_w, edge_b, edge_pe, edge_logit, signal0, numerator0, denominator0, max0,
        signals, energies, denominators, maxima,
        B, T, D: tl.constexpr, BD: tl.constexpr, BB: tl.constexpr,
    ):  # fmt: skip
        # One program per block of BB texts, looping over T with the running softmax in registers. Position kinds:
        # 0 padding (state kept, energy 0), 1 a text's first token (signal = start), 2 an edge (signal = N / D).
        # Tiles are (BB, BD) for vectors, (BB, BD, BD) for the texts' edge matrices.
        text = tl.program_id(0) * BB + tl.arange(0, BB)
        i = tl.arange(0, BD)
        live = text < B
        rows = live[:, None] & (i < D)[None, :]  # (BB, BD)
        cube = rows[:, :, None] & (i < D)[None, None, :]  # (BB, BD, BD)
        vector = text[:, None] * T * D + i[None, :]  # offsets of position 0 (BB, BD)
        matrix = text[:, None, None] * T * D * D + i[None, :, None] * D + i[None, None, :]
        state = text[:, None] * D + i[None, :]
        x = tl.load(signal0 + state, mask=rows, other=0.0)
        numerator = tl.load(numerator0 + state, mask=rows, other=0.0)
        denominator = tl.load(denominator0 + text, mask=live, other=0.0)
        run_max = tl.where(denominator > 0, tl.load(max0 + text, mask=live, other=0.0), float("-inf"))
        t = 0
        while t < T:  # (`while`, not `range`: the interpreter needs static `range` bounds)
            kind = tl.load(kinds + text * T + t, mask=live, other=0)
            w = tl.load(edge_w + matrix + t * D * D, mask=cube & (kind == 2)[:, None, None], other=0.0)
            z = tl.sum(x[:, :, None] * w, axis=1) + tl.load(edge_b + vector + t * D, mask=rows, other=0.0)
            z += tl.load(edge_pe + vector + t * D, mask=rows, other=0.0)
            energy, _ = _gelu_and_slope(z)
            logit = tl.load(edge_logit + text * T + t, mask=live, other=0.0)
            new_max = tl.maximum(run_max, logit)
            rescale = tl.exp(run_max - new_max)
            exp_logit = tl.exp(logit - new_max)
            edge = kind == 2
            numerator = tl.where(edge[:, None], numerator * rescale[:, None] + exp_logit[:, None] * energy, numerator)
            denominator = tl.where(edge, denominator * rescale + exp_logit, denominator)
            run_max = tl.where(edge, new_max, run_max)
            first = tl.load(start + vector + t * D, mask=rows, other=0.0)
            ratio = numerator / tl.where(edge, denominator, 1.0)[:, None]  # (the selects keep 0 / 0 out of sight)
            x = tl.where(edge[:, None], ratio, tl.where((kind == 1)[:, None], first, x))
            energy = tl.where(edge[:, None], energy, tl.where((kind == 1)[:, None], first, 0.0))
            tl.store(signals + vector + t * D, x, mask=rows)
            tl.store(energies + vector + t * D, energy, mask=rows)
            tl.store(denominators + text * T + t, denominator, mask=live)
            tl.store(maxima + text * T + t, run_max, mask=live)
            t += 1

    @triton.jit
    def _flow_backward_kernel(
        kinds, signal0, signals, edge_w, edge_b, edge_pe, edge_logit, denominators, maxima, grad_signals,
        grad_energies, grad_signal0, grad_start, grad_w, grad_b, grad_logit,
        B, T, D: tl.constexpr, BD: tl.constexpr, BB: tl.constexpr,
    ):  # fmt: skip
        # The recurrence in reverse. With x_t = N_t / D_t (running sums scaled by the running maximum m_t) at edges
        # t < u < ..., A_t = g_t / D_t + exp(m_t - m_u) A_u and likewise B_t = -(g_t . x_t) / D_t + ... give
        # dE_t = w_t A_t and dlogit_t = w_t (A_t . E_t + B_t), with w_t = exp(logit_t - m_t). ``carry`` is the
        # gradient on the signal of the moment (padding passes it through, a first token takes it).
        text = tl.program_id(0) * BB + tl.arange(0, BB)
        i = tl.arange(0, BD)
        live = text < B
        rows = live[:, None] & (i < D)[None, :]
        cube = rows[:, :, None] & (i < D)[None, None, :]
        vector = text[:, None] * T * D + i[None, :]
        matrix = text[:, None, None] * T * D * D + i[None, :, None] * D + i[None, None, :]
        carry = tl.zeros((BB, BD), tl.float32)
        acc_a = tl.zeros((BB, BD), tl.float32)
        acc_b = tl.sum(acc_a, axis=1)
        next_max = acc_b + float("inf")  # no later edge: its decay exp(m - inf) is 0
        t = T - 1
        while t >= 0:
            kind = tl.load(kinds + text * T + t, mask=live, other=0)
            edge = kind == 2
            g = tl.load(grad_signals + vector + t * D, mask=rows, other=0.0) + carry
            g_energy = tl.load(grad_energies + vector + t * D, mask=rows, other=0.0)
            denominator = tl.load(denominators + text * T + t, mask=live & edge, other=1.0)
            run_max = tl.load(maxima + text * T + t, mask=live & edge, other=0.0)
            x = tl.load(signals + vector + t * D, mask=rows, other=0.0)
            decay = tl.exp(run_max - next_max)  # (BB,)
            acc_a = tl.where(edge[:, None], g / denominator[:, None] + decay[:, None] * acc_a, acc_a)
            acc_b = tl.where(edge, -tl.sum(g * x, axis=1) / denominator + decay * acc_b, acc_b)
            next_max = tl.where(edge, run_max, next_max)
            exp_logit = tl.exp(tl.load(edge_logit + text * T + t, mask=live, other=0.0) - run_max)
            before = tl.where(t > 0, signals + vector + (t - 1) * D, signal0 + text[:, None] * D + i[None, :])
            previous = tl.load(before, mask=rows, other=0.0)
            w = tl.load(edge_w + matrix + t * D * D, mask=cube & edge[:, None, None], other=0.0)
            z = tl.sum(previous[:, :, None] * w, axis=1) + tl.load(edge_b + vector + t * D, mask=rows, other=0.0)
            z += tl.load(edge_pe + vector + t * D, mask=rows, other=0.0)
            energy, slope = _gelu_and_slope(z)
            d_logit = exp_logit * (tl.sum(acc_a * energy, axis=1) + acc_b)
            tl.store(grad_logit + text * T + t, tl.where(edge, d_logit, 0.0), mask=live)
            dz = tl.where(rows & edge[:, None], (exp_logit[:, None] * acc_a + g_energy) * slope, 0.0)
            tl.store(grad_w + matrix + t * D * D, previous[:, :, None] * dz[:, None, :], mask=cube)
            tl.store(grad_b + vector + t * D, dz, mask=rows)
            is_first = (kind == 1)[:, None]
            tl.store(grad_start + vector + t * D, tl.where(is_first, g + g_energy, 0.0), mask=rows)
            carry = tl.where(edge[:, None], tl.sum(w * dz[:, None, :], axis=2), tl.where(is_first, 0.0, g))
            t -= 1
        tl.store(grad_signal0 + text[:, None] * D + i[None, :], carry, mask=rows)


def _block(d):
    return max(16, triton.next_power_of_2(d))


def _texts_per_program(B):
    """Texts per recurrence program: one on a GPU (B programs run side by side); all of them (up to 16) under the
    interpreter, whose cost is per operation, not per element."""
    return min(16, triton.next_power_of_2(B)) if os.environ.get("TRITON_INTERPRET") == "1" else 1


# ----------------------------------------------------------------------------------------------------------------
# Autograd functions and the functional API


class _EdgeNLL(torch.autograd.Function):
    @staticmethod
    def forward(ctx, signal, pe, weights, biases, targets, plan, col_idx, vocab_size, sparse, link):
        N, d = signal.shape
        signal, pe = signal.contiguous(), pe.contiguous()
        part_max = signal.new_full((N, _SPLITS), float("-inf"), dtype=torch.float32)
        part_sum = signal.new_zeros((N, _SPLITS), dtype=torch.float32)
        own_score = signal.new_zeros(N, dtype=torch.float32)
        own_hit = torch.zeros(N, dtype=torch.int32, device=signal.device)
        shared_score = signal.new_empty(N, dtype=torch.float32)
        tables = (col_idx, plan.order, plan.first, plan.count, plan.lo, plan.degree)
        groups = min(N, vocab_size + 1)  # one group per node and one of unscored positions: no look at the plan
        _loss_forward_kernel[(groups, _SPLITS)](
            signal, pe, weights, biases, targets, *tables, part_max, part_sum, own_score, own_hit, shared_score,
            SPLITS=_SPLITS, D=d, BD=_block(d), BP=_BLOCK_P,
        )  # fmt: skip
        shared_term = shared_score + torch.log((vocab_size - plan.degree_of).float())  # -inf without shared targets
        pieces = torch.cat([part_max + torch.log(part_sum), shared_term[:, None]], 1)  # (N, SPLITS + 1)
        log_z = torch.logsumexp(pieces, 1)
        own = own_hit.bool()
        nll = log_z - torch.where(own, own_score, shared_score)
        ctx.save_for_backward(signal, pe, weights, biases, targets, col_idx, log_z, shared_term, own)
        ctx.plan, ctx.sparse, ctx.link, ctx.groups = plan, sparse, link, groups
        return nll.to(signal.dtype)

    @staticmethod
    def backward(ctx, grad_nll):
        signal, pe, weights, biases, targets, col_idx, log_z, shared_term, own = ctx.saved_tensors
        plan = ctx.plan
        N, d = signal.shape
        grad_nll = grad_nll.float().contiguous()
        shared_prob = torch.exp(shared_term - log_z) - (~own).float()  # d nll / d shared score
        grad_w = SlotGradient(weights, plan, ctx.sparse)
        grad_b = SlotGradient(biases, plan, ctx.sparse)
        grad_x_part = signal.new_zeros(_SPLITS, N, d, dtype=torch.float32)
        grad_pe_part = torch.zeros_like(grad_x_part)
        grad_shared_z = signal.new_zeros(N, d, dtype=torch.float32)
        tables = (col_idx, plan.order, plan.first, plan.count, plan.lo, plan.degree, grad_w.destination)
        _loss_backward_kernel[(ctx.groups, _SPLITS)](
            signal, pe, weights, biases, targets, *tables, grad_nll, log_z, shared_prob,
            grad_w.values, grad_b.values, grad_x_part, grad_pe_part, grad_shared_z,
            N, SPLITS=_SPLITS, D=d, BD=_block(d), BP=_BLOCK_P,
        )  # fmt: skip
        # The shared slot's reductions over all positions (slot 0 is row 0 in both layouts).
        grad_w.values[0] = (signal.float().t() @ grad_shared_z).to(grad_w.values.dtype)
        grad_b.values[0, 0] = grad_shared_z.sum(0).to(grad_b.values.dtype)
        grad_x = grad_x_part.sum(0).to(signal.dtype)
        grad_pe = (grad_pe_part.sum(0) + grad_shared_z).to(pe.dtype)
        if ctx.link is not None:
            ctx.link.leave("weights", grad_w)
            ctx.link.leave("biases", grad_b)
        return grad_x, grad_pe, grad_w.tensor(), grad_b.tensor(), None, None, None, None, None, None


def edge_nll(signal, pe, weights, biases, sources, targets, row_ptr, col_idx, sparse=False, link=None, plan=None):
    """Exact full-vocabulary negative log-likelihood (N,) of ``targets`` after positions leaving ``sources``.

    signal, pe (N, d) in the compute dtype (float32); weights (P, d, d) and biases (P, 1, d) in their own dtype (a
    bf16 slab is read as bf16 and accumulated in float32); sources, targets (N,); row_ptr (V+1,), col_idx (P-1,).
    ``sparse``: sparse COO gradients for weights and biases; ``link``: the model's gradient link, so that the
    recurrence's true-edge gather adds into the same gradient (see ``scoring_brillm.GradientLink``).
    """
    if plan is None:
        plan = scoring_plan(sources, row_ptr)
    vocab_size = row_ptr.numel() - 1
    args = (signal, pe, weights, biases, targets.long().contiguous(), plan, col_idx, vocab_size, sparse, link)
    return _EdgeNLL.apply(*args)


class _SignalFlow(torch.autograd.Function):
    @staticmethod
    def forward(ctx, kinds, start, edge_w, edge_b, edge_pe, edge_logit, signal0, numerator0, denominator0, max0):
        B, T, d = edge_pe.shape
        inputs = [t.contiguous() for t in (kinds, start, edge_w, edge_b, edge_pe, edge_logit)]
        state = [t.contiguous() for t in (signal0, numerator0, denominator0, max0)]
        signals, energies = start.new_empty(B, T, d), start.new_empty(B, T, d)
        denominators, maxima = start.new_empty(B, T), start.new_empty(B, T)
        BB = _texts_per_program(B)
        _flow_forward_kernel[(triton.cdiv(B, BB),)](
            *inputs, *state, signals, energies, denominators, maxima, B, T, D=d, BD=_block(d), BB=BB
        )
        kinds, _, edge_w, edge_b, edge_pe, edge_logit = inputs
        ctx.save_for_backward(kinds, state[0], signals, edge_w, edge_b, edge_pe, edge_logit, denominators, maxima)
        ctx.mark_non_differentiable(denominators, maxima)
        return signals, energies, denominators, maxima

    @staticmethod
    def backward(ctx, grad_signals, grad_energies, _grad_denominators, _grad_maxima):
        kinds, signal0, signals, edge_w, edge_b, edge_pe, edge_logit, denominators, maxima = ctx.saved_tensors
        B, T, d = signals.shape
        grad_signals = torch.zeros_like(signals) if grad_signals is None else grad_signals.contiguous()
        grad_energies = torch.zeros_like(signals) if grad_energies is None else grad_energies.contiguous()
        grad_signal0, grad_start = torch.empty_like(signal0), torch.empty_like(signals)
        grad_w, grad_b, grad_logit = torch.empty_like(edge_w), torch.empty_like(edge_b), torch.empty_like(edge_logit)
        BB = _texts_per_program(B)
        _flow_backward_kernel[(triton.cdiv(B, BB),)](
            kinds, signal0, signals, edge_w, edge_b, edge_pe, edge_logit, denominators, maxima, grad_signals,
            grad_energies, grad_signal0, grad_start, grad_w, grad_b, grad_logit, B, T, D=d, BD=_block(d), BB=BB,
        )  # fmt: skip
        grad_pe = grad_b.clone() if ctx.needs_input_grad[4] else None  # d z / d pe = d z / d b
        return None, grad_start, grad_w, grad_b, grad_pe, grad_logit, grad_signal0, None, None, None


def signal_flow(kinds, start, edge_w, edge_b, edge_pe, edge_logit, signal0, numerator0, denominator0, max0):
    """The signal recurrence over a chunk (``signal_brillm.flow_reference``'s loop) in one launch forward, one backward.

    kinds (B, T) int32: 0 padding (state kept), 1 a text's first token, 2 an edge arriving at the token. start (B, T,
    d) the signal of a first token; edge_w (B, T, d, d), edge_b and edge_pe (B, T, d), edge_logit (B, T) of each
    arriving edge (ignored elsewhere); the state before the chunk: signal0, numerator0 (B, d), denominator0 and
    max0 (B,) (a fresh state: zeros). All float32. Returns signals and energies (B, T, d) (energy 0 at padding, the
    start signal at a first token) and the running denominator and maximum logit after each position (B, T), which
    carry no gradient. Gradients flow to start, edge_w, edge_b, edge_pe, edge_logit and signal0.
    """
    return _SignalFlow.apply(kinds, start, edge_w, edge_b, edge_pe, edge_logit, signal0, numerator0, denominator0, max0)
