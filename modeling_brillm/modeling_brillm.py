"""BriLLM: a graph language model with one node per token and a signal that flows along edges.

Numerics follow the reference code (brillm05/BriLLM0.5) to float32 rounding; see ``SPEC.md``.

Notation used in shape comments: B batch, T chunk length, d hidden size, V vocabulary (nodes), P slots,
N scored positions, M owned (position, target) pairs.

This file is copied next to the weights by ``save_pretrained`` and loaded as remote code: it imports only
torch, numpy, transformers and its flat siblings ``configuration_brillm`` and ``hub_brillm`` (model cards,
publishing).
"""

import inspect
import math
import tempfile
from dataclasses import dataclass

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.generation.logits_process import LogitsProcessor
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput, logging

from .configuration_brillm import BriLLMConfig
from .hub_brillm import push_folder, write_model_card

logger = logging.get_logger(__name__)

# ----------------------------------------------------------------------------------------------------------------
# Positional encoding


_POSITIONAL_TABLES = {}


def sinusoidal_positions(length, hidden_size, device):
    """The reference positional encoding for positions ``0 .. length-1``: (length, hidden_size) float32.

    It *multiplies* the position by ``10000 ** (2k / d)`` (the usual encoding divides), so its arguments are
    huge and the values depend on float32 rounding: this is the reference's exact float32 expression.
    Tables are cached per device and grown in blocks of 512 rows as longer texts arrive.
    """
    key = (hidden_size, str(device))
    table = _POSITIONAL_TABLES.get(key)
    if table is None or table.shape[0] < length:
        rows = max(512, -(-length // 512) * 512)
        position = torch.arange(0, rows).reshape(-1, 1)
        div_term = 10000.0 ** (torch.arange(0, hidden_size, 2) / hidden_size)
        table = torch.zeros(rows, hidden_size)
        table[:, 0::2] = torch.sin(position * div_term)
        table[:, 1::2] = torch.cos(position * div_term)
        table = table.to(device)
        _POSITIONAL_TABLES[key] = table
    return table[:length]


# ----------------------------------------------------------------------------------------------------------------
# The edge graph


def dense_graph(vocab_size):
    """CSR slot map of the dense graph (every edge owns a slot): ``(row_ptr (V+1,) int64, col_idx (V*V,) int32)``."""
    row_ptr = torch.arange(0, vocab_size + 1, dtype=torch.int64) * vocab_size
    col_idx = torch.arange(vocab_size, dtype=torch.int32).repeat(vocab_size)
    return row_ptr, col_idx


class BriLLMEdgeGraph(nn.Module):
    """Which edges own a parameter slot, as CSR buffers saved with the weights.

    Slots are numbered row-major in node-id order: source ``s`` owns slots ``1 + row_ptr[s] .. row_ptr[s+1]``
    (one contiguous slab of ``weights``), whose targets are the sorted ``col_idx[row_ptr[s]:row_ptr[s+1]]``.
    Every other edge uses the shared slot 0.

    Example:

    ```python
    >>> import torch
    >>> from modeling_brillm.modeling_brillm import BriLLMEdgeGraph
    >>> graph = BriLLMEdgeGraph(vocab_size=3, num_slots=4)
    >>> graph.set_graph(torch.tensor([0, 2, 2, 3]), torch.tensor([0, 2, 1], dtype=torch.int32))
    >>> graph.slots(torch.tensor([0, 0, 1, 2]), torch.tensor([2, 1, 1, 1])).tolist()  # 0->1 and 1->1 are shared
    [2, 0, 0, 3]

    ```
    """

    def __init__(self, vocab_size, num_slots):
        super().__init__()
        self.vocab_size = vocab_size
        self.num_slots = num_slots
        if num_slots == 1 + vocab_size * vocab_size:
            row_ptr, col_idx = dense_graph(vocab_size)
        else:  # filled by set_graph() or by loading a checkpoint
            row_ptr = torch.zeros(vocab_size + 1, dtype=torch.int64)
            col_idx = torch.zeros(num_slots - 1, dtype=torch.int32)
        self.register_buffer("row_ptr", row_ptr)
        self.register_buffer("col_idx", col_idx)
        self._checked = False
        self._derived = {}  # tables computed from the buffers: see `_table`

    def set_graph(self, row_ptr, col_idx):
        """Install a CSR slot map (validated; raises `ValueError` when it does not fit this graph)."""
        row_ptr = torch.as_tensor(row_ptr, dtype=torch.int64)
        col_idx = torch.as_tensor(col_idx, dtype=torch.int32)
        self._validate(row_ptr, col_idx)
        with torch.no_grad():
            self.row_ptr.copy_(row_ptr)
            self.col_idx.copy_(col_idx)
        self._checked = True
        self._derived = {}

    def check(self):
        """Validate the buffers once (after construction or loading); raises `ValueError` if they are unusable."""
        if not self._checked:
            self._validate(self.row_ptr, self.col_idx)
            self._checked = True
            self._derived = {}

    def _validate(self, row_ptr, col_idx):
        V, own = self.vocab_size, self.num_slots - 1
        if tuple(row_ptr.shape) != (V + 1,) or tuple(col_idx.shape) != (own,):
            raise ValueError(
                f"edge graph buffers have shapes row_ptr {tuple(row_ptr.shape)} and col_idx {tuple(col_idx.shape)}, "
                f"but the config says vocab_size={V} and num_slots={self.num_slots}: expected row_ptr ({V + 1},) "
                f"and col_idx ({own},). The checkpoint and its config.json do not belong together."
            )
        if row_ptr.device.type == "meta":
            return
        if int(row_ptr[0]) != 0 or int(row_ptr[-1]) != own or bool((row_ptr[1:] < row_ptr[:-1]).any()):
            raise ValueError(
                f"edge graph row_ptr must start at 0, never decrease and end at num_slots - 1 = {own}; it ends at "
                f"{int(row_ptr[-1])}. If this is a sparse model, build the graph with set_graph()/from_graph() "
                "or load it from a checkpoint that contains it."
            )
        if own == 0:
            return
        if int(col_idx.min()) < 0 or int(col_idx.max()) >= V:
            raise ValueError(f"edge graph col_idx holds targets outside [0, {V}).")
        keys = _edge_keys(row_ptr, col_idx, V)
        if bool((keys[1:] <= keys[:-1]).any()):
            raise ValueError("edge graph col_idx must be strictly increasing within each source row (no duplicates).")

    def _load_from_state_dict(self, *args, **kwargs):
        super()._load_from_state_dict(*args, **kwargs)
        self._checked = False
        self._derived = {}

    def _table(self, name, build):
        """A table derived from the buffers, kept until they change (set_graph, loading) or move (``.to()``)."""
        key = (self.row_ptr.data_ptr(), self.col_idx.data_ptr())
        entry = self._derived.get(name)
        if entry is None or entry[0] != key:
            entry = self._derived[name] = (key, build())
        return entry[1]

    def targets(self):
        """``col_idx`` as int64, the index type of scatters: (P-1,)."""
        return self._table("targets", lambda: self.col_idx.long())

    def _host(self):
        """``(row_ptr, col_idx)`` as NumPy arrays for host-side look-ups (views of the buffers on the CPU)."""
        return self._table("host", lambda: (self.row_ptr.cpu().numpy(), self.col_idx.cpu().numpy()))

    def row(self, source):
        """``(lo, hi)``: the owned edges of ``source`` (a host int) are ``lo .. hi-1``, its slots ``1+lo .. hi``."""
        row_ptr = self._host()[0]
        return int(row_ptr[source]), int(row_ptr[source + 1])

    def degrees(self):
        """Number of owned out-edges of every node: (V,) int64."""
        return self.row_ptr[1:] - self.row_ptr[:-1]

    def slots(self, sources, targets):
        """Slot of each edge ``sources[i] -> targets[i]`` (any shape; 0 where the edge is shared)."""
        edge_keys = self._table("edge_keys", lambda: _edge_keys(self.row_ptr, self.col_idx, self.vocab_size))
        keys = sources.long() * self.vocab_size + targets.long()
        if edge_keys.numel() == 0:
            return torch.zeros_like(keys)
        found = torch.searchsorted(edge_keys, keys)
        hit = edge_keys[found.clamp(max=edge_keys.numel() - 1)] == keys
        return torch.where(hit, found + 1, torch.zeros_like(found))

    def slot(self, source, target):
        """Slot of one edge given as host ints (0 when shared): a binary search in the source's row."""
        lo, hi = self.row(source)
        col_idx = self._host()[1]
        k = lo + int(col_idx[lo:hi].searchsorted(target))
        return 1 + k if k < hi and int(col_idx[k]) == target else 0


def _edge_keys(row_ptr, col_idx, vocab_size):
    """``source * V + target`` of every owned edge, in slot order (sorted for a valid graph): (P-1,) int64."""
    sources = torch.repeat_interleave(torch.arange(vocab_size, device=row_ptr.device), row_ptr[1:] - row_ptr[:-1])
    return sources * vocab_size + col_idx.long()


# ----------------------------------------------------------------------------------------------------------------
# The SiFu cache: the whole generation state, O(d) per sequence


class BriLLMCache:
    """The signal-flow state of a batch of texts: everything BriLLM needs to score the next token.

    The signal leaving token ``k`` (k >= 1) is the softmax(positional logits)-weighted mean of the energies of
    the edges travelled so far, kept as a running numerator/denominator (rescaled by their running maximum
    logit, so nothing overflows). With the last token and the count of tokens this is the whole state: it does
    not grow with the text, so generation has no length limit and a constant cost per token.

    The tensors are created by the first forward that uses the cache (an empty cache fits any batch size).
    For assisted decoding, ``activate_past_recording()`` keeps the state after every position so that
    ``crop(-n)`` can roll the last n positions back.

    Attributes:
        signal: (B, d) signal that will leave the last token.
        numerator: (B, d) sum of ``exp(p_j - max_logit) * E_j`` over travelled edges ``j``.
        denominator: (B,) sum of ``exp(p_j - max_logit)``.
        max_logit: (B,) running maximum positional logit (no gradient flows through it).
        last_token: (B,) last real token, -1 before the first.
        num_tokens: (B,) real (unmasked) tokens consumed.
        seen_positions: columns of ``input_ids`` consumed, padding included (what ``generate`` expects).

    Example:

    ```python
    >>> import torch
    >>> from modeling_brillm import BriLLMConfig, BriLLMForCausalLM
    >>> model = BriLLMForCausalLM(BriLLMConfig(vocab_size=16, hidden_size=4)).eval()
    >>> out = model(torch.tensor([[3, 5, 7]]), use_cache=True)
    >>> cache = out.past_key_values
    >>> cache.get_seq_length(), cache.signal.shape
    (3, torch.Size([1, 4]))
    >>> step = model(torch.tensor([[2]]), past_key_values=cache)  # scores the token after 3 5 7 2
    >>> step.logits.shape
    torch.Size([1, 1, 16])

    ```
    """

    is_compileable = False
    is_linear = [False]
    is_croppable = True
    _TENSORS = ("signal", "numerator", "denominator", "max_logit", "last_token", "num_tokens")

    def __init__(self):
        for name in self._TENSORS:
            setattr(self, name, None)
        self.seen_positions = 0
        self.record_past = False
        self._past = []  # states after each recorded position, oldest first

    def initialize(self, batch_size, hidden_size, device, dtype):
        """Create the empty state of ``batch_size`` texts (done by the first forward)."""
        self.signal = torch.zeros(batch_size, hidden_size, device=device, dtype=dtype)
        self.numerator = torch.zeros(batch_size, hidden_size, device=device, dtype=dtype)
        self.denominator = torch.zeros(batch_size, device=device, dtype=dtype)
        self.max_logit = torch.zeros(batch_size, device=device, dtype=dtype)
        self.last_token = torch.full((batch_size,), -1, device=device, dtype=torch.long)
        self.num_tokens = torch.zeros(batch_size, device=device, dtype=torch.long)
        self._record()

    @property
    def is_initialized(self):
        return self.signal is not None

    @property
    def batch_size(self):
        return self.signal.shape[0] if self.is_initialized else None

    def get_seq_length(self, layer_idx=0):
        return self.seen_positions

    def _map(self, fn):
        if self.is_initialized:
            for name in self._TENSORS:
                setattr(self, name, fn(getattr(self, name)))
            self._past = []
            self._record()

    def reorder_cache(self, beam_idx):
        """Select rows in place (beam search)."""
        self._map(lambda t: t.index_select(0, beam_idx.to(t.device)))

    def batch_select_indices(self, indices):
        self._map(lambda t: t[indices])

    def batch_repeat_interleave(self, repeats):
        self._map(lambda t: t.repeat_interleave(repeats, dim=0))

    def activate_past_recording(self):
        """Keep the state after every position from now on, so that `crop` can roll positions back."""
        self.record_past = True
        self._past = []
        self._record()

    def _record(self):
        if self.record_past and self.is_initialized:
            self._past.append((self.seen_positions, *(getattr(self, name) for name in self._TENSORS)))

    def crop(self, tokens_to_remove):
        """Forget the last ``-tokens_to_remove`` positions (a negative int); ``crop(0)`` only frees the history."""
        if tokens_to_remove > 0:
            raise ValueError(f"crop takes a negative number of positions to remove; got {tokens_to_remove}.")
        if tokens_to_remove < 0:
            target = self.seen_positions + tokens_to_remove
            states = [state for state in self._past if state[0] == target]
            if not states:
                raise ValueError(
                    f"cannot roll back to position {target}: call activate_past_recording() before the positions "
                    "to be removed are consumed."
                )
            self.seen_positions, *tensors = states[0]
            for name, tensor in zip(self._TENSORS, tensors):
                setattr(self, name, tensor)
        if self.record_past:
            self._past = []
            self._record()

    def __repr__(self):
        return f"BriLLMCache(batch_size={self.batch_size}, seen_positions={self.seen_positions})"


def _accumulate(cache, energy, logit):
    """The running softmax after one more edge per text: ``exp(logit) * energy`` added to the cache's sums.

    energy (B, d), logit (B,). Rescaled by the running maximum logit, so nothing overflows. Returns the new
    numerator (B, d), denominator (B,) and maximum logit (B,); ``cache`` itself is left unchanged.
    """
    new_max = torch.where(cache.denominator > 0, torch.maximum(cache.max_logit, logit), logit).detach()
    rescale = torch.exp((cache.max_logit - new_max).clamp(max=0))
    weight = torch.exp(logit - new_max)
    numerator = cache.numerator * rescale[:, None] + weight[:, None] * energy
    return numerator, cache.denominator * rescale + weight, new_max


# ----------------------------------------------------------------------------------------------------------------
# Scoring every target of many positions: one slab GEMM per source node


@dataclass
class _ScoringPlan:
    """Positions grouped by source node, and where each of their scores goes.

    The kernels lay scores out as (M + N,): the owned scores group by group, each group a (targets, positions)
    block of its source's slab, then the shared-slot score of every position.
    """

    order: torch.Tensor | None  # (N,) positions sorted by source, the kernels' order; None: already in it
    inverse: torch.Tensor | None  # (N,) where each position went in that order
    groups: list  # [(lo, hi, first, count)] per distinct source: slab 1 + lo .. hi, sorted positions first ..
    pair_index: torch.Tensor  # (M,) position * V + target of each owned score, in kernel order
    num_pairs: int  # M


def _single_source_plan(graph, source):
    """The plan of one position leaving ``source`` (a host int): one slab, nothing to sort."""
    lo, hi = graph.row(source)
    return _ScoringPlan(None, None, [(lo, hi, 0, 1)], graph.targets()[lo:hi], hi - lo)


def _plan_scoring(graph, sources):
    """Group positions by their source node (N,): see `_ScoringPlan`.

    Sorting happens where the sources are; the index of every owned score is computed on the host with NumPy,
    where its dozen small operations cost a few microseconds each instead of tens.
    """
    if sources.numel() == 1:  # batch-1 generation
        return _single_source_plan(graph, int(sources))
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
    return _ScoringPlan(order, torch.argsort(order), groups, pair_index, num_pairs)


def _compute_dtype(dtype):
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def _gelu(z, inplace=False):
    """Exact GELU (``inplace``: overwriting z, when large). ``F.gelu`` hands every contiguous float32 CPU tensor to
    oneDNN, whose per-call setup (~10 us) dwarfs the arithmetic of a few signals (generation, the recurrence):
    those take the erf formula instead."""
    if z.numel() > 4096 or z.device.type != "cpu":
        return torch.ops.aten.gelu_(z) if inplace else F.gelu(z)
    return torch.erf(z * 0.7071067811865476).add_(1.0).mul_(z).mul_(0.5)


def _preactivations(signal, pe, weights, biases, plan):
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


class _SlotGradient:
    """The gradient of ``weights`` or ``biases`` (P, ...) that one backward of `_EdgeScores` builds.

    Dense: a full-size tensor, zero except the touched slots. Sparse: a coalesced COO tensor whose values hold only
    slot 0 and the slabs of the plan's sources, in slot order. Either way each slab's gradient is written once,
    into its own view, and `add_rows` lets the recurrence's true-edge gather add its few rows in place.
    """

    def __init__(self, param, plan, sparse):
        self.shape, self.sparse = param.shape, sparse
        if not sparse:
            self.values = torch.zeros_like(param)
            return
        slabs = [(lo, hi) for lo, hi, _, _ in plan.groups if hi > lo]
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

    def add_rows(self, slots, grad):
        """Add ``grad`` (n, ...) at ``slots`` (n,); False (nothing added) when a sparse gradient lacks a slot."""
        if self.sparse:
            found = torch.searchsorted(self.slots, slots).clamp(max=self.slots.numel() - 1)
            if not bool((self.slots[found] == slots).all()):
                return False
            slots = found
        self.values.index_add_(0, slots, grad.to(self.values.dtype))
        return True

    def tensor(self):
        if not self.sparse:
            return self.values
        return torch.sparse_coo_tensor(
            self.slots[None], self.values, self.shape, is_coalesced=True, check_invariants=False
        )


class _GradientLink:
    """Lets the recurrence's gather of true-edge slots add into the scoring kernel's slot gradients in place.

    Both read ``weights`` and ``biases``; left to autograd, their two gradients would be summed into a third
    full-size (dense) or concatenated (sparse) tensor. The kernel's backward runs first (the recurrence feeds its
    signals): it leaves its `_SlotGradient`s here, tagged with the running backward pass, and the gather's backward
    in that same pass adds its rows into them and returns no gradient of its own. (Autograd hands a parameter its
    gradient only after every branch that reads it has run, so the kernel's tensor is still in flight then.)
    """

    def __init__(self, sparse):
        self.sparse = sparse
        self.pending = {}  # "weights" / "biases" -> (backward pass id, _SlotGradient)

    def leave(self, name, gradient):
        self.pending[name] = (torch._C._current_graph_task_id(), gradient)

    def take(self, name):
        task, gradient = self.pending.pop(name, (None, None))
        return gradient if task == torch._C._current_graph_task_id() else None


class _EdgeScores(torch.autograd.Function):
    """Scores ``||GELU(x W + b + pe)||`` of the plan's owned pairs and of the shared slot: (M + N,).

    Forward keeps the pre-activations z (M + N, d). Backward recomputes GELU from z, reads each slab once more for
    the signal gradient, and writes each slab's gradient into its own view of one `_SlotGradient` (dense, or
    sparse when ``sparse``), never a full-size gradient per slab. ``link`` (optional) is the `_GradientLink`
    shared with the recurrence that produced the signals.
    """

    @staticmethod
    def forward(ctx, signal, pe, weights, biases, plan, sparse, link):
        z = _preactivations(signal, pe, weights, biases, plan)
        scores = torch.linalg.vector_norm(_gelu(z), dim=-1)
        ctx.save_for_backward(signal, z, scores, weights, biases)
        ctx.plan, ctx.sparse, ctx.link = plan, sparse, link
        return scores

    @staticmethod
    def backward(ctx, grad_scores):
        signal, z, scores, weights, biases = ctx.saved_tensors
        plan = ctx.plan
        need_x, _, need_w, need_b, _, _, _ = ctx.needs_input_grad
        d, compute = signal.shape[1], signal.dtype
        y = _gelu(z)
        grad_y = y.mul_((grad_scores / scores.clamp_min(torch.finfo(compute).tiny))[:, None])
        grad_z = torch.ops.aten.gelu_backward.grad_input(grad_y, z, grad_input=grad_y)  # (M + N, d), in y's memory
        grad_x = torch.zeros_like(signal) if need_x else None
        grad_w = _SlotGradient(weights, plan, ctx.sparse) if need_w else None
        grad_b = _SlotGradient(biases, plan, ctx.sparse) if need_b else None
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


class _GatherSlots(torch.autograd.Function):
    """``param[slots]``: the recurrence's true-edge matrices or biases (n, ...).

    Backward adds its rows into the scoring kernel's gradient of the same pass when there is one (see
    `_GradientLink`), so ``param`` receives a single gradient; otherwise it returns its own, sparse or dense.
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


def _gather_slots(param, slots, link, name):
    """``param[slots]`` (n, ...); through `_GatherSlots` when a backward will want its gradient."""
    if link is None:
        return param.index_select(0, slots)
    return _GatherSlots.apply(param, slots, link, name)


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
    """The scores (M + N,) of a plan by `_scores_kernel`, for no-grad float32 scoring on CUDA with triton installed.

    PyTorch (`_preactivations`) computes the same everywhere else; ``triton_scores.enabled = False`` turns it off.
    """

    enabled = True

    def available(self):
        return triton is not None and torch.cuda.is_available()

    def usable(self, signal):
        return self.enabled and signal.is_cuda and signal.dtype == torch.float32 and self.available()

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
# Models


@dataclass
class BriLLMModelOutput(ModelOutput):
    """Output of `BriLLMModel`.

    Args:
        last_hidden_state: (B, T, d) the signal leaving each token (the input of its out-edges).
        energies: (B, T, d) the energy each token received: ``GELU(1/d + node_bias + PE[0])`` for a text's first
            token, else the energy of the edge that arrived at it. Zero at padding.
        signal_positions: (B, T) index of the edge leaving each token within its text (0 for the first
            token's out-edge), -1 at padding.
        cache: the `BriLLMCache` after this chunk, when ``use_cache``.
        hidden_states: ``(last_hidden_state,)`` when ``output_hidden_states``.
    """

    last_hidden_state: torch.Tensor | None = None
    energies: torch.Tensor | None = None
    signal_positions: torch.Tensor | None = None
    cache: BriLLMCache | None = None
    hidden_states: tuple | None = None


class BriLLMPreTrainedModel(PreTrainedModel):
    """Weight initialisation and loading shared by the BriLLM models."""

    config_class = BriLLMConfig
    base_model_prefix = "model"
    main_input_name = "input_ids"
    _no_split_modules = []
    _is_stateful = False
    supports_gradient_checkpointing = False

    @torch.no_grad()
    def _init_weights(self, module):
        if isinstance(module, BriLLMModel):
            r = self.config.initializer_range
            for tensor in (module.weights, module.biases, module.node_bias):
                if not getattr(tensor, "_is_hf_initialized", False):
                    tensor.uniform_(-r, r)
            if not getattr(module.positions, "_is_hf_initialized", False):
                module.positions.fill_(self.config.position_init)

    @classmethod
    def from_pretrained(cls, *args, allow_non_finite_weights=False, **kwargs):
        """`PreTrainedModel.from_pretrained`, then the slot map is checked and so are the weights: NaN or infinite
        values raise `ValueError` unless ``allow_non_finite_weights=True`` (then a warning names them)."""
        model = super().from_pretrained(*args, **kwargs)
        model.get_edge_graph().check()
        source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        _check_finite_weights(model, source, allow_non_finite_weights)
        return model

    @staticmethod
    def _finalize_model_loading(model, load_config, loading_info, *args, **kwargs):
        # transformers 5 hook, run after the checkpoint tensors are read and before mismatched or missing ones are
        # re-initialised: stop there with a clear error instead (see `_check_checkpoint_fits_config`).
        _check_checkpoint_fits_config(model, load_config, loading_info)
        return PreTrainedModel._finalize_model_loading(model, load_config, loading_info, *args, **kwargs)

    def get_edge_graph(self):
        """The model's `BriLLMEdgeGraph` (slot map)."""
        return self.base_model.graph

    def set_sparse_gradients(self, enabled=True):
        """Give ``weights`` and ``biases`` sparse COO gradients that hold only the slots a batch touched.

        A batch touches slot 0 and the slabs of the nodes it passes through (a few percent of all slots), so a
        sparse gradient skips writing, zeroing and reading the full (P, d, d) tensor every step, and an optimizer
        that updates only those rows skips the rest too. Dense gradients stay the default because every
        optimizer, gradient clipping and `Trainer` accept them; ``node_bias`` and ``positions`` are always dense.
        Sparse gradients need an optimizer that takes them: ``modeling_brillm.optimization.LazyAdamW`` (AdamW on
        the touched rows only), `torch.optim.SGD`, or `torch.optim.SparseAdam` (slow); `torch.optim.AdamW`, gradient
        clipping and `Trainer` refuse them. The setting is not saved with the model.
        """
        self.base_model.sparse_gradients = enabled

    def save_pretrained(self, save_directory, *args, **kwargs):
        # One checkpoint serves AutoConfig, AutoModel and AutoModelForCausalLM as remote code.
        self.config.auto_map = {
            "AutoConfig": "configuration_brillm.BriLLMConfig",
            "AutoModel": "modeling_brillm.BriLLMModel",
            "AutoModelForCausalLM": "modeling_brillm.BriLLMForCausalLM",
        }
        saved = super().save_pretrained(save_directory, *args, **kwargs)
        if kwargs.get("is_main_process", True):
            write_model_card(save_directory, self.config, overwrite=False)  # a default card; callers may add more
        return saved

    def push_to_hub(self, repo_id, *, max_shard_size="50GB", tags=(), **hub_kwargs):
        """Upload weights, code and model card in one commit (`hub_brillm.push_folder` takes ``hub_kwargs``)."""
        with tempfile.TemporaryDirectory() as folder:
            self.save_pretrained(folder, max_shard_size=max_shard_size)
            write_model_card(folder, self.config, repo_id=repo_id, tags=list(tags or ()))
            return push_folder(folder, repo_id, **hub_kwargs)


class BriLLMModel(BriLLMPreTrainedModel):
    r"""The BriLLM graph: node biases, edge slots, positional weights, and the signal recurrence.

    Parameters (names and shapes of the reference checkpoint):
    ``weights`` (P, d, d) edge matrices applied as ``x @ W``; ``biases`` (P, 1, d); ``node_bias`` (V, 1, d),
    used only to start the signal at a text's first token; ``positions`` (1, max_position_embeddings, 1), the
    logits of the softmax that weights earlier edge energies. The slot map is ``graph`` (`BriLLMEdgeGraph`).

    ``forward`` returns the signal leaving each token (``last_hidden_state``) and the energies of the path
    travelled; `BriLLMForCausalLM` turns signals into next-token scores with `score_next`.

    Example:

    ```python
    >>> import torch
    >>> from modeling_brillm import BriLLMConfig, BriLLMModel
    >>> model = BriLLMModel(BriLLMConfig(vocab_size=16, hidden_size=4))
    >>> out = model(torch.tensor([[1, 2, 3]]))
    >>> out.last_hidden_state.shape, out.signal_positions.tolist()
    (torch.Size([1, 3, 4]), [[0, 1, 2]])
    >>> model.score_next(torch.tensor([[3]]), out.last_hidden_state[:, -1:], out.signal_positions[:, -1:]).shape
    torch.Size([1, 1, 16])

    ```
    """

    def __init__(self, config):
        super().__init__(config)
        V, d, P = config.vocab_size, config.hidden_size, config.num_slots
        self.weights = nn.Parameter(torch.empty(P, d, d))
        self.biases = nn.Parameter(torch.empty(P, 1, d))
        self.node_bias = nn.Parameter(torch.empty(V, 1, d))
        self.positions = nn.Parameter(torch.empty(1, config.max_position_embeddings, 1))
        self.graph = BriLLMEdgeGraph(V, P)
        self.sparse_gradients = False  # see `set_sparse_gradients`
        self.post_init()

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        past_key_values=None,
        cache=None,
        use_cache=None,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
    ):
        self.graph.check()
        cache = _pick_cache(past_key_values, cache)
        input_ids, mask = self._check_inputs(input_ids, attention_mask, cache)
        if use_cache is None:
            use_cache = not self.training
        if cache is None:
            cache = BriLLMCache()
        if not cache.is_initialized:
            compute = _compute_dtype(self.weights.dtype)
            cache.initialize(input_ids.shape[0], self.config.hidden_size, input_ids.device, compute)
        signals, energies, positions, link = self._flow(input_ids, mask, cache)
        output = BriLLMModelOutput(
            last_hidden_state=signals,
            energies=energies,
            signal_positions=positions,
            cache=cache if use_cache else None,
            hidden_states=(signals,) if output_hidden_states else None,
        )
        output.gradient_link = link  # an attribute, not an output field: internal to BriLLMForCausalLM
        return output

    def _check_inputs(self, input_ids, attention_mask, cache):
        if input_ids is None:
            raise ValueError("BriLLM needs input_ids (B, T) of token ids; inputs_embeds are not supported.")
        if not isinstance(input_ids, torch.Tensor) or input_ids.dtype.is_floating_point or input_ids.dtype == torch.bool:
            raise ValueError(f"input_ids must be an integer tensor of token ids; got {type(input_ids).__name__}.")
        if input_ids.dim() != 2:
            raise ValueError(
                f"input_ids must have shape (batch, length); got {tuple(input_ids.shape)}. "
                "For one text use input_ids.unsqueeze(0)."
            )
        if input_ids.shape[0] == 0 or input_ids.shape[1] == 0:
            raise ValueError(f"input_ids is empty (shape {tuple(input_ids.shape)}): give at least one token.")
        V = self.config.vocab_size
        low, high = int(input_ids.min()), int(input_ids.max())
        if low < 0 or high >= V:
            bad = low if low < 0 else high
            raise ValueError(f"input_ids contains token id {bad}, outside this model's vocabulary [0, {V}).")
        B, T = input_ids.shape
        past = cache.seen_positions if cache is not None else 0
        if cache is not None and cache.is_initialized and cache.batch_size != B:
            raise ValueError(f"the cache holds {cache.batch_size} texts but input_ids has batch size {B}.")
        if attention_mask is None:
            return input_ids, torch.ones_like(input_ids, dtype=torch.bool)
        if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
            raise ValueError("attention_mask must be a (batch, length) tensor of 0/1.")
        if attention_mask.shape[0] != B or attention_mask.shape[1] not in (T, past + T):
            expected = f"({B}, {T})" + (f" or ({B}, {past + T})" if past else "")
            raise ValueError(
                f"attention_mask has shape {tuple(attention_mask.shape)} but input_ids has {tuple(input_ids.shape)}: "
                f"expected {expected}."
            )
        mask = attention_mask[:, -T:]
        if bool(((mask != 0) & (mask != 1)).any()):
            raise ValueError("attention_mask must hold only 0 (padding) and 1 (token).")
        return input_ids, mask.bool()

    def _flow(self, input_ids, mask, cache):
        """Advance ``cache`` over a chunk, left to right; padded positions leave the state unchanged.

        Returns signals (B, T, d), energies (B, T, d), the index of each token's out-edge (B, T), and the
        `_GradientLink` of the true-edge gather (None without autograd), for `score_next`.
        """
        B, T = input_ids.shape
        d, V = self.config.hidden_size, self.config.vocab_size
        compute = cache.signal.dtype
        device = input_ids.device
        steps = mask.long()
        tokens_before = cache.num_tokens[:, None] + torch.cumsum(steps, 1) - steps  # (B, T)
        # Previous real token of each position (the source of the edge that arrives there).
        column = torch.arange(T, device=device).expand(B, T)
        last_real = torch.cummax(torch.where(mask, column, torch.full_like(column, -1)), dim=1).values
        prev_column = torch.cat([torch.full_like(last_real[:, :1], -1), last_real[:, :-1]], dim=1)
        prev_token = torch.where(
            prev_column >= 0, input_ids.gather(1, prev_column.clamp(min=0)), cache.last_token[:, None]
        )
        arriving_edge = (tokens_before - 1).clamp(min=0)  # index of the edge that arrives at each position
        # One gather for all arriving edges (per-step indexing of a Parameter would cost a full-size grad each).
        slots = self.graph.slots(prev_token.clamp(min=0), input_ids).reshape(-1)
        link = None
        if torch.is_grad_enabled() and (self.weights.requires_grad or self.biases.requires_grad):
            link = _GradientLink(self.sparse_gradients)
        edge_w = _gather_slots(self.weights, slots, link, "weights").view(B, T, d, d).to(compute)
        edge_b = _gather_slots(self.biases, slots, link, "biases").view(B, T, d).to(compute)
        last_pe = int(arriving_edge.max()) + max(self.config.position_shift, 1) + 1
        pe_table = sinusoidal_positions(last_pe, d, device).to(compute)
        edge_pe = pe_table[arriving_edge + self.config.position_shift]  # (B, T, d)
        max_learned = self.config.max_position_embeddings - 1
        edge_logit = self.positions.view(-1)[arriving_edge.clamp(max=max_learned)].to(compute)  # (B, T)
        start = _gelu(1.0 / d + self.node_bias.view(V, d)[input_ids].to(compute) + pe_table[0])  # (B, T, d)

        if cache.seen_positions == 0 and not cache.record_past and bool(mask.all()):
            signals, energies = self._flow_unpadded(input_ids, cache, start, edge_w, edge_b, edge_pe, edge_logit)
            return torch.stack(signals, 1), torch.stack(energies, 1), tokens_before, link
        signals, energies = [], []
        for t in range(T):
            present = mask[:, t]
            is_first = present & (tokens_before[:, t] == 0)
            is_edge = present & (tokens_before[:, t] > 0)
            energy = _gelu(
                torch.bmm(cache.signal.unsqueeze(1), edge_w[:, t]).squeeze(1) + edge_b[:, t] + edge_pe[:, t]
            )  # (B, d)
            numerator, denominator, new_max = _accumulate(cache, energy, edge_logit[:, t])
            edge_rows, first_rows = is_edge[:, None], is_first[:, None]
            cache.signal = torch.where(
                edge_rows, numerator / denominator[:, None], torch.where(first_rows, start[:, t], cache.signal)
            )
            cache.numerator = torch.where(edge_rows, numerator, cache.numerator)
            cache.denominator = torch.where(is_edge, denominator, cache.denominator)
            cache.max_logit = torch.where(is_edge, new_max, cache.max_logit)
            cache.last_token = torch.where(present, input_ids[:, t], cache.last_token)
            cache.num_tokens = cache.num_tokens + steps[:, t]
            cache.seen_positions += 1
            cache._record()
            signals.append(cache.signal)
            energies.append(
                torch.where(edge_rows, energy, torch.where(first_rows, start[:, t], torch.zeros_like(energy)))
            )
        signal_positions = torch.where(mask, tokens_before, torch.full_like(tokens_before, -1))
        return torch.stack(signals, 1), torch.stack(energies, 1), signal_positions, link

    def _flow_unpadded(self, input_ids, cache, start, edge_w, edge_b, edge_pe, edge_logit):
        """`_flow`'s loop for its most common chunk, whole texts without padding from a fresh cache (training,
        evaluation): every text is at the same position, so the running softmax's rescale factors and weights are
        the same for all and are computed for all steps at once (`_accumulate`'s arithmetic, the same bits).
        Returns the lists of signals and energies."""
        signal = cache.signal = start[:, 0]
        signals, energies = [signal], [signal]
        T = input_ids.shape[1]
        if T > 1:
            logit = edge_logit[0, 1:]  # (T - 1,) the positional logit of each edge
            running_max = torch.cummax(logit.detach(), 0).values
            before = torch.cat([cache.max_logit[:1], running_max[:-1]])
            rescales = torch.exp((before - running_max).clamp(max=0)).unbind(0)
            weights = torch.exp(logit - running_max).unbind(0)
            numerator, denominator = cache.numerator, cache.denominator
            for t in range(1, T):
                energy = _gelu(torch.bmm(signal.unsqueeze(1), edge_w[:, t]).squeeze(1) + edge_b[:, t] + edge_pe[:, t])
                numerator = numerator * rescales[t - 1] + weights[t - 1] * energy
                denominator = denominator * rescales[t - 1] + weights[t - 1]
                signal = numerator / denominator[:, None]
                signals.append(signal)
                energies.append(energy)
            cache.signal, cache.numerator, cache.denominator = signal, numerator, denominator
            cache.max_logit = running_max[-1].expand_as(cache.max_logit).clone()
        cache.last_token = input_ids[:, -1]
        cache.num_tokens = cache.num_tokens + T
        cache.seen_positions += T
        return signals, energies

    def _decode_step(self, input_ids, attention_mask, cache):
        """Advance ``cache`` by one token per text and score the next one: logits (B, V), no autograd.

        Generation's lean path, equal to `forward` + `score_next` on a (B, 1) chunk whose texts all hold a token
        already: one gather of the arriving edges, one running-softmax update, one scoring plan. Returns None,
        having touched nothing, for any other chunk (padding, a text's first token, bad input), which the general
        path then takes (and explains, if bad).
        """
        if not self._decodable(input_ids, attention_mask, cache):
            return None
        if input_ids.shape[0] == 1 and input_ids.device.type == "cpu":  # (on a GPU its host reads would stall it)
            logits = self._decode_one(input_ids[0], cache)
            if logits is not None:
                return logits
        low, high, fewest = torch.stack([input_ids.min(), input_ids.max(), cache.num_tokens.min()]).tolist()
        if not (0 <= low and high < self.config.vocab_size and fewest > 0):
            return None
        d, shift, compute = self.config.hidden_size, self.config.position_shift, cache.signal.dtype
        token = input_ids[:, 0]  # (B,)
        edge = cache.num_tokens - 1  # (B,) index of the edge arriving at token
        pe = sinusoidal_positions(int(cache.num_tokens.max()) + shift + 1, d, token.device).to(compute)
        slots = self.graph.slots(cache.last_token, token)
        energy = _gelu(
            torch.bmm(cache.signal[:, None], self.weights[slots].to(compute))[:, 0]
            + self.biases[slots, 0].to(compute)
            + pe[edge + shift]
        )  # (B, d)
        logit = self.positions.view(-1)[edge.clamp(max=self.config.max_position_embeddings - 1)].to(compute)
        cache.numerator, cache.denominator, cache.max_logit = _accumulate(cache, energy, logit)
        cache.signal = cache.numerator / cache.denominator[:, None]
        cache.last_token, cache.num_tokens = token, cache.num_tokens + 1
        cache.seen_positions += 1
        cache._record()
        return self._score(token, cache.signal, pe[edge + 1 + shift])

    def _decodable(self, input_ids, attention_mask, cache):
        """Whether the chunk has the shape `_decode_step` takes: one unmasked token per text of a running cache.
        (Whether the tokens are valid and follow one, it checks on the values it reads anyway.)"""
        if not (isinstance(cache, BriLLMCache) and cache.is_initialized and isinstance(input_ids, torch.Tensor)):
            return False
        B = cache.batch_size
        if input_ids.dtype not in (torch.int64, torch.int32) or tuple(input_ids.shape) != (B, 1):
            return False
        if attention_mask is not None:
            if not isinstance(attention_mask, torch.Tensor) or attention_mask.dim() != 2:
                return False
            if attention_mask.shape[0] != B or attention_mask.shape[1] not in (1, cache.seen_positions + 1):
                return False
            newest = attention_mask[:, -1]
            if not (int(newest) == 1 if B == 1 else bool((newest == 1).all())):
                return False
        self.graph.check()
        return True

    def _decode_one(self, token, cache):
        """`_decode_step` for one text on the CPU, its scalars on the host; None for what it does not take.

        The arithmetic of `_flow` and `_score_planned` in the fewest tensor operations (about 30): in generation
        each costs several microseconds, as much as the slab read of a small node. Weights in another precision
        than the cache's go the general way.
        """
        config, graph, weights, biases = self.config, self.graph, self.weights, self.biases
        V, d, shift = config.vocab_size, config.hidden_size, config.position_shift
        source, target, before = int(cache.last_token), int(token), int(cache.num_tokens)  # arriving edge before - 1
        signal = cache.signal
        if not (0 <= target < V and before > 0) or weights.dtype != signal.dtype:
            return None
        pe = sinusoidal_positions(before + shift + 1, d, token.device).to(signal.dtype)
        # The arriving edge's energy joins the running softmax (its scalars in Python, double precision).
        slot = graph.slot(source, target)
        energy = torch.addmm(biases[slot], signal, weights[slot]).add_(pe[before - 1 + shift])
        logit = float(self.positions.view(-1)[min(before - 1, config.max_position_embeddings - 1)])
        old_max, old_sum = float(cache.max_logit), float(cache.denominator)
        new_max = max(old_max, logit) if old_sum > 0 else logit
        rescale, weight = math.exp(min(old_max - new_max, 0.0)), math.exp(logit - new_max)
        scalars = torch.tensor([old_sum * rescale + weight, new_max], dtype=signal.dtype)
        cache.numerator = torch.add(cache.numerator * rescale, _gelu(energy, inplace=True), alpha=weight)
        cache.denominator, cache.max_logit = scalars[:1], scalars[1:]
        cache.signal = signal = cache.numerator / scalars[0]
        cache.last_token, cache.num_tokens = token, cache.num_tokens + 1
        cache.seen_positions += 1
        cache._record()
        # The next token's scores: its slab and the shared slot, in one (n + 1, d) block.
        lo, hi = graph.row(target)
        n = hi - lo
        z = signal.new_empty(n + 1, d)
        slab = slice(1 + lo, 1 + hi)
        torch.baddbmm(biases[slab], signal.expand(n, 1, d), weights[slab], out=z[:n].view(n, 1, d))
        torch.addmm(biases[0], signal, weights[0], out=z[n:])
        scores = torch.linalg.vector_norm(_gelu(z.add_(pe[before + shift]), inplace=True), dim=-1)  # (n + 1,)
        logits = scores[n:].expand(V).clone()
        return logits.index_put_((graph.targets()[lo:hi],), scores[:n]).view(1, V)

    def _score(self, sources, signals, pe, gradient_link=None):
        """Full-vocabulary logits (N, V) of N positions: sources (N,), signals and their PE rows (N, d)."""
        return self._score_planned(_plan_scoring(self.graph, sources), signals, pe, gradient_link)

    def _score_planned(self, plan, signals, pe, gradient_link=None):
        V = self.config.vocab_size
        if plan.order is not None:
            signals, pe = signals[plan.order], pe[plan.order]
        weights, biases = self.weights, self.biases
        if torch.is_grad_enabled() and (signals.requires_grad or weights.requires_grad or biases.requires_grad):
            scores = _EdgeScores.apply(signals, pe, weights, biases, plan, self.sparse_gradients, gradient_link)
        elif triton_scores.usable(signals):
            scores = triton_scores(signals, pe, weights, biases, plan)
        else:  # nothing to keep: GELU in place
            z = _preactivations(signals, pe, weights, biases, plan)
            scores = torch.linalg.vector_norm(_gelu(z, inplace=True), dim=-1)
        shared = scores[plan.num_pairs :]  # (N,)
        if plan.order is not None:
            shared = shared[plan.inverse]  # back in position order
        logits = shared[:, None].expand(-1, V).contiguous().view(-1)  # (N * V,)
        return logits.index_put_((plan.pair_index,), scores[: plan.num_pairs]).view(-1, V)

    def score_next(self, sources, signals, signal_positions, gradient_link=None):
        """Full-vocabulary next-token logits: (B, T, V) from sources (B, T), signals (B, T, d), edge indices (B, T).

        ``logits[b, t, v] = ||GELU(x W[slot(u, v)] + b[slot(u, v)] + PE[i + position_shift])||`` with
        ``u = sources[b, t]``, ``x = signals[b, t]``, ``i = signal_positions[b, t]``. Every shared target of
        ``u`` takes the one shared-slot score; owned targets are scored one source slab at a time. Positions
        with ``signal_positions < 0`` (padding) get all-zero logits. ``gradient_link`` is internal: the
        `_GradientLink` of the forward that produced ``signals``, so that ``weights`` gets one gradient.
        """
        B, T = sources.shape
        V, d = self.config.vocab_size, self.config.hidden_size
        index = (signal_positions >= 0).reshape(-1).nonzero().squeeze(1)  # unpadded positions (N,)
        if index.numel() == 0:
            return signals.new_zeros(B, T, V, dtype=torch.float32)
        positions = signal_positions.reshape(-1)[index] + self.config.position_shift
        pe = sinusoidal_positions(int(positions.max()) + 1, d, signals.device).to(signals.dtype)[positions]
        logits = self._score(sources.reshape(-1)[index], signals.reshape(-1, d)[index], pe, gradient_link)
        if index.numel() < B * T:  # padding scores nothing
            logits = logits.new_zeros(B * T, V).index_copy(0, index, logits)
        return logits.view(B, T, V).float()


class _SuppressSelfLoop(LogitsProcessor):
    """Never propose the current token as the next one (the reference decoder's rule)."""

    def __call__(self, input_ids, scores):
        return scores.scatter(1, input_ids[:, -1:], float("-inf"))

    # `LogitsProcessorList` asks for the signature of every processor at every token; a stored one is ~10x cheaper.
    __call__.__signature__ = inspect.signature(__call__)


class BriLLMForCausalLM(BriLLMPreTrainedModel, GenerationMixin):
    r"""BriLLM with next-token logits, the causal-LM loss and ``generate``.

    ``logits[:, i]`` scores the token after ``input_ids[:, i]`` over the whole vocabulary (the score of a target
    is the norm of the energy its edge lets through). ``labels`` follow the Hugging Face convention (equal to
    ``input_ids``, shifted inside, -100 ignored). The generation state is a `BriLLMCache` of O(d) per text.

    Example:

    ```python
    >>> import torch
    >>> from modeling_brillm import BriLLMConfig, BriLLMForCausalLM
    >>> torch.manual_seed(0)  # doctest: +ELLIPSIS
    <...>
    >>> model = BriLLMForCausalLM(BriLLMConfig(vocab_size=16, hidden_size=4)).eval()
    >>> ids = torch.tensor([[1, 2, 3, 4]])
    >>> out = model(ids, labels=ids)
    >>> out.logits.shape, out.loss.ndim
    (torch.Size([1, 4, 16]), 0)
    >>> model.generate(ids, max_new_tokens=5, do_sample=False).shape
    torch.Size([1, 9])

    ```
    """

    def __init__(self, config):
        super().__init__(config)
        self.model = BriLLMModel(config)
        self.post_init()

    @classmethod
    def from_graph(cls, config, row_ptr, col_idx):
        """A freshly initialised model (reference init) on the given CSR slot map.

        ``config.num_slots`` must equal ``1 + len(col_idx)``.
        """
        if config.num_slots != 1 + len(col_idx):
            raise ValueError(
                f"config.num_slots={config.num_slots} but the graph owns {len(col_idx)} edges: "
                f"set num_slots={1 + len(col_idx)}."
            )
        model = cls(config)
        model.get_edge_graph().set_graph(row_ptr, col_idx)
        return model

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        labels=None,
        past_key_values=None,
        cache=None,
        use_cache=None,
        logits_to_keep=0,
        output_hidden_states=None,
        return_dict=None,
        **kwargs,
    ):
        state = _pick_cache(past_key_values, cache)
        lean = labels is None and not output_hidden_states and not torch.is_grad_enabled()
        logits = self.model._decode_step(input_ids, attention_mask, state) if lean else None
        if logits is not None:  # generation's lean path, same numbers
            state = None if use_cache is False else state
            return CausalLMOutputWithPast(logits=logits[:, None].float(), past_key_values=state)
        outputs = self.model(
            input_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
        )
        keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
        logits = self.model.score_next(
            input_ids[:, keep],
            outputs.last_hidden_state[:, keep],
            outputs.signal_positions[:, keep],
            getattr(outputs, "gradient_link", None),  # absent when a hook rebuilt the output: only slower
        )
        loss = None
        if labels is not None:
            if labels.shape != input_ids.shape:
                raise ValueError(f"labels must have the shape of input_ids {tuple(input_ids.shape)}; got {tuple(labels.shape)}.")
            bad = (labels != -100) & ((labels < 0) | (labels >= self.config.vocab_size))
            if bool(bad.any()):
                raise ValueError(
                    f"labels contains {int(labels[bad][0])}: use token ids in [0, {self.config.vocab_size}) "
                    "or -100 for positions to ignore."
                )
            loss = self.loss_function(logits=logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        return CausalLMOutputWithPast(
            loss=loss, logits=logits, past_key_values=outputs.cache, hidden_states=outputs.hidden_states
        )

    def sampled_loss(self, input_ids, candidate_ids, attention_mask=None):
        """The reference training objective: cross-entropy over a few candidates per edge, the true one first.

        ``candidate_ids`` (B, L-1, 1+K) lists, for the edge leaving ``input_ids[:, i]``, the true next token
        followed by K negatives (the reference draws the K most frequent successors of the source). Scores are
        the model's exact logits gathered at the candidates; the loss is their mean cross-entropy with label 0
        over the edges whose both ends are unmasked.
        """
        B, L = input_ids.shape
        if candidate_ids.dim() != 3 or tuple(candidate_ids.shape[:2]) != (B, L - 1):
            raise ValueError(
                f"candidate_ids must have shape (batch, length - 1, 1 + K) = ({B}, {L - 1}, 1 + K); "
                f"got {tuple(candidate_ids.shape)}."
            )
        if not torch.equal(candidate_ids[..., 0], input_ids[:, 1:]):
            raise ValueError("candidate_ids[..., 0] must be the true next tokens input_ids[:, 1:].")
        logits = self(input_ids, attention_mask=attention_mask, use_cache=False).logits[:, :-1]
        scores = logits.gather(-1, candidate_ids.long())  # (B, L-1, 1+K)
        labels = torch.zeros(B, L - 1, dtype=torch.long, device=scores.device)
        if attention_mask is not None:
            edge_kept = attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool()
            labels = labels.masked_fill(~edge_kept, -100)
        return F.cross_entropy(scores.reshape(B * (L - 1), -1), labels.reshape(-1), ignore_index=-100)

    @classmethod
    def _supports_default_dynamic_cache(cls):
        return False  # never a DynamicCache: the state is a BriLLMCache

    def _prepare_cache_for_generation(self, generation_config, model_kwargs, *args, **kwargs):
        # Install an empty state before prefill (assisted decoding needs one); the signature differs across versions.
        if generation_config.use_cache is False or _pick_cache(*(model_kwargs.get(k) for k in _CACHE_NAMES)):
            return
        cache = BriLLMCache()
        if generation_config.is_assistant:
            cache.activate_past_recording()
        model_kwargs[_CACHE_KWARG] = cache

    def prepare_inputs_for_generation(self, input_ids, next_sequence_length=None, **kwargs):
        """The forward inputs of one `generate` step. A decoding step with the usual arguments gets the generic
        version's result (the newest token, the state, the other arguments) built directly: the generic one also
        inspects `forward`'s signature and looks up the parameters' device at every token, which takes as long as
        BriLLM's whole step. Everything else goes the generic way."""
        cache = kwargs.get(_CACHE_KWARG)
        if (
            next_sequence_length != 1
            or not (isinstance(cache, BriLLMCache) and cache.is_initialized)
            or not _DECODE_STEP_KWARGS.issuperset(kwargs)
            or input_ids.device != cache.signal.device
        ):
            return super().prepare_inputs_for_generation(input_ids, next_sequence_length=next_sequence_length, **kwargs)
        inputs = {"input_ids": input_ids[:, -1:], **kwargs}
        if inputs.get("attention_mask", 0) is None:
            del inputs["attention_mask"]
        return inputs

    def _get_logits_processor(self, generation_config, *args, **kwargs):
        processors = super()._get_logits_processor(generation_config, *args, **kwargs)
        if self.config.suppress_self_loop:
            processors.insert(0, _SuppressSelfLoop())
        return processors


_CACHE_NAMES = ("past_key_values", "cache")
# transformers 5.24 renamed the generation state from `past_key_values` to `cache`.
_CACHE_KWARG = "cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters else "past_key_values"
# The keyword arguments of a plain decoding step, which `prepare_inputs_for_generation` passes on unchanged.
_DECODE_STEP_KWARGS = {_CACHE_KWARG, "attention_mask", "use_cache", "logits_to_keep", "output_hidden_states",
                       "output_attentions", "return_dict"}  # fmt: skip


def _pick_cache(past_key_values, cache):
    """The state passed under either name (``cache`` from transformers 5.24, ``past_key_values`` before)."""
    for state in (cache, past_key_values):
        if isinstance(state, BriLLMCache):
            return state
    return None  # nothing, or a foreign cache object such as an empty DynamicCache: start fresh


def _check_checkpoint_fits_config(model, load_config, loading_info):
    """Raise `ValueError` when the checkpoint's tensors do not fit the config the model was built from.

    transformers would re-initialise a tensor whose shape differs (after an unhelpful `RuntimeError`, or
    silently with ``ignore_mismatched_sizes=True``) and leave absent buffers as uninitialised memory. The edge
    matrices, node biases and slot map only mean something together, so a mismatch there is always an error;
    ``positions`` may still be re-initialised on request (``ignore_mismatched_sizes=True``).
    """
    config = model.config
    prefix = model.base_model_prefix + "."
    problems, saved = [], {}
    for key, checkpoint_shape, model_shape in sorted(getattr(loading_info, "mismatched_keys", ())):
        name = key[len(prefix) :] if key.startswith(prefix) else key
        if name == "positions" and getattr(load_config, "ignore_mismatched_sizes", False):
            continue
        checkpoint_shape, model_shape = tuple(checkpoint_shape), tuple(model_shape)
        problems.append(f"{key} is {checkpoint_shape} in the checkpoint but the config needs {model_shape}")
        if name in ("weights", "biases"):
            saved["num_slots"] = checkpoint_shape[0]
        elif name == "graph.col_idx":
            saved["num_slots"] = checkpoint_shape[0] + 1
        elif name in ("node_bias", "graph.row_ptr"):
            saved["vocab_size"] = checkpoint_shape[0] - (name == "graph.row_ptr")
        elif name == "positions":
            saved["max_position_embeddings"] = checkpoint_shape[1]
    for key in sorted(getattr(loading_info, "missing_keys", ())):
        name = key[len(prefix) :] if key.startswith(prefix) else key
        if name.startswith("graph."):
            problems.append(f"{key} (the slot map) is missing from the checkpoint")
        elif name in ("weights", "biases", "node_bias", "positions"):  # never re-initialised at random in silence
            problems.append(f"{key} is missing from the checkpoint")
    if problems:
        hint = ", ".join(f"{name}={value} (config.json: {getattr(config, name)})" for name, value in saved.items())
        raise ValueError(
            f"the checkpoint does not fit its config (vocab_size={config.vocab_size}, hidden_size="
            f"{config.hidden_size}, num_slots={config.num_slots}, max_position_embeddings="
            f"{config.max_position_embeddings}): " + "; ".join(problems) + "."
            + (f" The tensors were saved with {hint}." if hint else "")
            + " A BriLLM config.json must match the weights and slot map saved with it; do not edit num_slots "
            "or vocab_size by hand."
        )


def count_non_finite(tensor, block=1 << 24):
    """NaN and infinite values of ``tensor``, counted in blocks (no full-size temporary)."""
    flat = tensor.detach().reshape(-1)
    return sum(int((~torch.isfinite(flat[i : i + block])).sum()) for i in range(0, flat.numel(), block))


def _check_finite_weights(model, source, allow):
    """Raise `ValueError` naming ``source`` and the tensors holding NaN or infinite values (only warn if ``allow``)."""
    bad = {name: count_non_finite(p) for name, p in model.named_parameters() if p.is_floating_point()}
    bad = {name: count for name, count in bad.items() if count}
    if not bad:
        return
    found = ", ".join(f"{name} ({count:,})" for name, count in bad.items())
    if not allow:
        raise ValueError(
            f"{source}: NaN or infinite weights in {found}; the checkpoint is corrupted or its training diverged. "
            "Load it anyway with allow_non_finite_weights=True (--allow-non-finite-weights)."
        )
    logger.warning(f"{source}: loaded NaN or infinite weights in {found}; its outputs will be NaN.")


BriLLMModel.register_for_auto_class("AutoModel")
BriLLMForCausalLM.register_for_auto_class("AutoModelForCausalLM")

__all__ = [
    "BriLLMCache",
    "BriLLMEdgeGraph",
    "BriLLMForCausalLM",
    "BriLLMModel",
    "BriLLMPreTrainedModel",
    "dense_graph",
    "sinusoidal_positions",
]
