"""The signal recurrence of BriLLM (SPEC §3-4) and its state, the `BriLLMCache`.

A text's first token starts the signal with ``GELU(1/d + node_bias + PE[0])``; every later token receives the
energy ``E = GELU(x W + b + PE)`` of the edge that arrives at it, and the signal leaving it is the
softmax(positional logits)-weighted mean of the energies travelled so far. That mean is kept as a running
numerator and denominator, so the whole state of a text is O(d).

`flow` is the one dispatch point: `flow_reference` is the plain loop over positions (padding, a running cache,
recording for roll-back), `flow_unpadded` the fast path for whole texts from a fresh cache (training, evaluation).
This file is a flat sibling of ``modeling_brillm.py`` (remote code): it imports only torch and its sibling
``kernels_brillm`` (whose triton is optional).
"""

import math
from dataclasses import dataclass

import torch
import torch.nn.functional as F

from .kernels_brillm import kernels_wanted, signal_flow


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


def compute_dtype(dtype):
    """The precision the signal is computed in for weights of ``dtype``: half precisions compute in float32."""
    return torch.float32 if dtype in (torch.float16, torch.bfloat16) else dtype


def gelu(z, inplace=False):
    """Exact GELU (``inplace``: overwriting z, when large). ``F.gelu`` hands every contiguous float32 CPU tensor to
    oneDNN, whose per-call setup (~10 us) dwarfs the arithmetic of a few signals (generation, the recurrence):
    those take the erf formula instead."""
    if z.numel() > 4096 or z.device.type != "cpu":
        return torch.ops.aten.gelu_(z) if inplace else F.gelu(z)
    return torch.erf(z * 0.7071067811865476).add_(1.0).mul_(z).mul_(0.5)


def edge_energy(signal, weights, biases, pe):
    """``GELU(x W + b + PE)`` of one edge per text: signal (B, d), weights (B, d, d), biases and pe (B, d) -> (B, d)."""
    return gelu(torch.baddbmm(biases.unsqueeze(1), signal.unsqueeze(1), weights).squeeze(1) + pe)


def accumulate(numerator, denominator, max_logit, energy, logit):
    """The running softmax after one more edge per text: ``exp(logit) * energy`` joins the sums.

    numerator and energy (B, d); denominator, max_logit and logit (B,). Both sums are kept relative to the running
    maximum logit, so nothing overflows. Returns the new ``(numerator, denominator, max_logit)``.
    """
    new_max = torch.where(denominator > 0, torch.maximum(max_logit, logit), logit).detach()
    rescale = torch.exp((max_logit - new_max).clamp(max=0))
    exp_logit = torch.exp(logit - new_max)  # the edge's softmax weight, before the division by the denominator
    return numerator * rescale[:, None] + exp_logit[:, None] * energy, denominator * rescale + exp_logit, new_max


def accumulate_one(numerator, denominator, max_logit, energy, logit):
    """`accumulate` for one text whose scalars are host floats (generation's batch-1 fast path, where each tensor
    operation costs as much as its arithmetic): numerator and energy (1, d); returns ``(numerator, denominator,
    max_logit)`` with the last two as floats."""
    new_max = max(max_logit, logit) if denominator > 0 else logit
    rescale, exp_logit = math.exp(min(max_logit - new_max, 0.0)), math.exp(logit - new_max)
    return torch.add(numerator * rescale, energy, alpha=exp_logit), denominator * rescale + exp_logit, new_max


# ----------------------------------------------------------------------------------------------------------------
# The state


class BriLLMCache:
    """The signal-flow state of a batch of texts: everything BriLLM needs to score the next token.

    The signal leaving token ``k`` (k >= 1) is the softmax(positional logits)-weighted mean of the energies of
    the edges travelled so far, kept as a running numerator/denominator (rescaled by their running maximum
    logit, so nothing overflows). With the last token and the count of tokens this is the whole state: it does
    not grow with the text, so generation has no length limit and a constant cost per token.

    The tensors are created by the first forward that uses the cache (an empty cache fits any batch size), and
    change only through `advance`. For assisted decoding, ``activate_past_recording()`` keeps the state after
    every position so that ``crop(-n)`` can roll the last n positions back.

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

    def advance(self, columns=1, **state):
        """Move on by ``columns`` columns of ``input_ids``, to the new ``state`` (any of the tensor attributes)."""
        for name, tensor in state.items():
            if name not in self._TENSORS:
                raise TypeError(f"BriLLMCache has no state {name!r}; it holds {', '.join(self._TENSORS)}.")
            setattr(self, name, tensor)
        self.seen_positions += columns
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


# ----------------------------------------------------------------------------------------------------------------
# The recurrence over a chunk


@dataclass
class EdgeInputs:
    """What the recurrence needs of a chunk (B, T), gathered by the model from its parameters.

    ``weights``, ``biases``, ``pe`` and ``logits`` describe the edge that arrives at each token (from the previous
    real token of its text, in the chunk or in the cache); they are unused where the token starts its text.
    """

    tokens: torch.Tensor  # (B, T) token ids
    mask: torch.Tensor  # (B, T) bool, False at padding
    tokens_before: torch.Tensor  # (B, T) real tokens of the text before each column (the cache's included)
    start: torch.Tensor  # (B, T, d) GELU(1/d + node_bias[token] + PE[0]): the signal of a text's first token
    weights: torch.Tensor  # (B, T, d, d) matrix of the arriving edge
    biases: torch.Tensor  # (B, T, d)
    pe: torch.Tensor  # (B, T, d)
    logits: torch.Tensor  # (B, T) positional logit of the arriving edge


def flow(cache, edges):
    """Advance ``cache`` over a chunk, left to right: the signals (B, T, d) leaving and energies (B, T, d) arriving
    at each token (zero at padding). Where `kernels_wanted` (float32, no recorded past) the Triton kernel takes any
    chunk (`flow_kernel`); otherwise whole texts from a fresh cache take `flow_unpadded`, the rest `flow_reference`."""
    if kernels_wanted(edges.start.device) and edges.start.dtype == torch.float32 and not cache.record_past:
        return flow_kernel(cache, edges)
    if cache.seen_positions == 0 and not cache.record_past and bool(edges.mask.all()):
        return flow_unpadded(cache, edges)
    return flow_reference(cache, edges)


def flow_reference(cache, edges):
    """`flow` one position at a time, any chunk: padded positions leave the state unchanged."""
    T = edges.tokens.shape[1]
    # unbind: one view per step whose gradients autograd stacks once (indexing per step would zero-fill a
    # full-size gradient per step: a backward quadratic in T).
    weights, biases, pe, logits = edges.weights.unbind(1), edges.biases.unbind(1), edges.pe.unbind(1), edges.logits.unbind(1)
    signals, energies = [], []
    for t in range(T):
        present = edges.mask[:, t]
        is_first = (present & (edges.tokens_before[:, t] == 0))[:, None]
        is_edge = present & (edges.tokens_before[:, t] > 0)
        energy = edge_energy(cache.signal, weights[t], biases[t], pe[t])  # (B, d)
        numerator, denominator, max_logit = accumulate(
            cache.numerator, cache.denominator, cache.max_logit, energy, logits[t]
        )
        start = edges.start[:, t]
        cache.advance(
            signal=torch.where(
                is_edge[:, None], numerator / denominator[:, None], torch.where(is_first, start, cache.signal)
            ),
            numerator=torch.where(is_edge[:, None], numerator, cache.numerator),
            denominator=torch.where(is_edge, denominator, cache.denominator),
            max_logit=torch.where(is_edge, max_logit, cache.max_logit),
            last_token=torch.where(present, edges.tokens[:, t], cache.last_token),
            num_tokens=cache.num_tokens + present.long(),
        )
        signals.append(cache.signal)
        energies.append(torch.where(is_edge[:, None], energy, torch.where(is_first, start, torch.zeros_like(energy))))
    return torch.stack(signals, 1), torch.stack(energies, 1)


def flow_kernel(cache, edges):
    """`flow` by `kernels_brillm.signal_flow`: one launch forward and one backward for the whole chunk (B, T)."""
    present = edges.mask
    kinds = (present & (edges.tokens_before == 0)).int() + 2 * (present & (edges.tokens_before > 0)).int()
    state = (cache.signal, cache.numerator, cache.denominator, cache.max_logit)
    signals, energies, denominators, maxima = signal_flow(
        kinds, edges.start, edges.weights, edges.biases, edges.pe, edges.logits, *state
    )
    B, T = edges.tokens.shape
    column = torch.arange(T, device=present.device).expand(B, T)
    last = torch.where(present, column, -1).max(1, keepdim=True).values  # (B, 1) last real column, -1 for none
    signal, denominator = signals[:, -1], denominators[:, -1]
    cache.advance(
        T,
        signal=signal,
        numerator=signal * denominator[:, None],  # (0 while a text has no edge yet)
        denominator=denominator,
        max_logit=torch.where(denominator > 0, maxima[:, -1], cache.max_logit),
        last_token=torch.where(last[:, 0] >= 0, edges.tokens.gather(1, last.clamp(min=0))[:, 0], cache.last_token),
        num_tokens=cache.num_tokens + present.sum(1),
    )
    return signals, energies


def flow_unpadded(cache, edges):
    """`flow` for whole texts without padding from a fresh cache (training, evaluation). Every text is at the same
    position, so the running softmax's rescale factors and exp(logit) terms are the same for all texts and are
    computed for all steps at once (`accumulate`'s arithmetic, the same bits)."""
    T = edges.tokens.shape[1]
    signal = edges.start[:, 0]
    signals, energies = [signal], [signal]
    numerator, denominator, max_logit = cache.numerator, cache.denominator, cache.max_logit
    if T > 1:
        logit = edges.logits[0, 1:]  # (T - 1,) the positional logit of each edge
        running_max = torch.cummax(logit.detach(), 0).values
        before = torch.cat([max_logit[:1], running_max[:-1]])
        rescales = torch.exp((before - running_max).clamp(max=0)).unbind(0)
        exp_logits = torch.exp(logit - running_max).unbind(0)
        edge_w, edge_b, edge_pe = edges.weights.unbind(1), edges.biases.unbind(1), edges.pe.unbind(1)
        for t in range(1, T):
            energy = edge_energy(signal, edge_w[t], edge_b[t], edge_pe[t])
            numerator = numerator * rescales[t - 1] + exp_logits[t - 1] * energy
            denominator = denominator * rescales[t - 1] + exp_logits[t - 1]
            signal = numerator / denominator[:, None]
            signals.append(signal)
            energies.append(energy)
        max_logit = running_max[-1].expand_as(max_logit).clone()
    cache.advance(
        T,
        signal=signal,
        numerator=numerator,
        denominator=denominator,
        max_logit=max_logit,
        last_token=edges.tokens[:, -1],
        num_tokens=cache.num_tokens + T,
    )
    return torch.stack(signals, 1), torch.stack(energies, 1)


__all__ = [
    "BriLLMCache",
    "EdgeInputs",
    "accumulate",
    "accumulate_one",
    "compute_dtype",
    "edge_energy",
    "flow",
    "flow_kernel",
    "flow_reference",
    "flow_unpadded",
    "gelu",
    "sinusoidal_positions",
]
