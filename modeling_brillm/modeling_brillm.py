"""BriLLM: a graph language model with one node per token and a signal that flows along edges.

Numerics follow the reference code (brillm05/BriLLM0.5) to float32 rounding; see ``SPEC.md``. Read in this order:
``graph_brillm.py`` (the edge graph), ``signal_brillm.py`` (the signal recurrence and its cache),
``scoring_brillm.py`` (next-token scores and their gradient), then the models below.

Notation used in shape comments: B batch, T chunk length, d hidden size, V vocabulary (nodes), P slots,
N scored positions, M owned (position, target) pairs.

This file is copied next to the weights by ``save_pretrained`` and loaded as remote code: it imports only
torch, transformers and its flat siblings.
"""

import contextvars
import inspect
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn
from transformers import GenerationMixin, PreTrainedModel
from transformers.generation.logits_process import LogitsProcessor
from transformers.modeling_outputs import CausalLMOutputWithPast
from transformers.utils import ModelOutput, logging

from .configuration_brillm import BriLLMConfig
from .graph_brillm import BriLLMEdgeGraph, forget_gradients
from .scoring_brillm import (
    GradientLink,
    gather_slots,
    kernel_loss_wanted,
    next_token_logits,
    next_token_loss,
    plan_scoring,
    score,
    score_one,
)
from .signal_brillm import (
    BriLLMCache,
    EdgeInputs,
    accumulate,
    accumulate_one,
    compute_dtype,
    edge_energy,
    flow,
    gelu,
    sinusoidal_positions,
)

logger = logging.get_logger(__name__)

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
        logits: (B, T', V) next-token scores of the last T' tokens, when ``logits_to_keep`` is given.
        loss: the causal-LM loss of ``labels`` when the Triton kernels computed it (no logits then).
    """

    last_hidden_state: torch.Tensor | None = None
    energies: torch.Tensor | None = None
    signal_positions: torch.Tensor | None = None
    cache: BriLLMCache | None = None
    hidden_states: tuple | None = None
    logits: torch.Tensor | None = None
    loss: torch.Tensor | None = None


_NO_EMBEDDINGS = (
    "BriLLM has no embedding matrix: a token is a node of the graph, whose edges own the parameters "
    "(weights, biases, node_bias), so there are no input/output embeddings to get, set or resize. "
    "A new vocabulary needs a new graph (a new model)."
)


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
        if isinstance(module, BriLLMEdgeGraph):  # meta-device init (FSDP, init_empty_weights) comes through here
            if not any(getattr(t, "_is_hf_initialized", False) for t in (module.row_ptr, module.col_idx)):
                module.reset_graph()
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
        values raise `ValueError` unless ``allow_non_finite_weights=True`` (then a warning names them). A checkpoint
        that lacks a weight is refused, unless the caller asked for the loading info (which lists what is missing
        and was initialised) or gave no checkpoint at all (``from_pretrained(None, config=..., state_dict=...)``)."""
        told = kwargs.get("output_loading_info", False)
        token = _MISSING_WEIGHTS_REPORTED.set(told)
        try:
            loaded = super().from_pretrained(*args, **kwargs)  # (model, loading_info) with output_loading_info=True
        finally:
            _MISSING_WEIGHTS_REPORTED.reset(token)
        model = loaded[0] if isinstance(loaded, tuple) else loaded
        model.get_edge_graph().check()
        source = args[0] if args else kwargs.get("pretrained_model_name_or_path")
        _check_finite_weights(model, source, allow_non_finite_weights)
        return loaded

    @staticmethod
    def _finalize_model_loading(model, load_config, loading_info, *args, **kwargs):
        # transformers 5 hook, run after the checkpoint tensors are read and before mismatched or missing ones are
        # re-initialised: stop there with a clear error instead (see `_check_checkpoint_fits_config`).
        _check_checkpoint_fits_config(model, load_config, loading_info)
        return PreTrainedModel._finalize_model_loading(model, load_config, loading_info, *args, **kwargs)

    def get_edge_graph(self):
        """The model's `BriLLMEdgeGraph` (slot map)."""
        return self.base_model.graph

    def get_input_embeddings(self):
        raise NotImplementedError(_NO_EMBEDDINGS)

    def set_input_embeddings(self, value):
        raise NotImplementedError(_NO_EMBEDDINGS)

    def resize_token_embeddings(self, *args, **kwargs):
        raise NotImplementedError(_NO_EMBEDDINGS)

    def set_sparse_gradients(self, enabled=True):
        """Give ``weights`` and ``biases`` sparse COO gradients that hold only the slots a batch touched.

        A batch touches slot 0 and the slabs of the nodes it passes through, so a sparse gradient skips writing,
        zeroing and reading the full (P, d, d) tensor every step, and an optimizer that updates only those rows
        skips the rest too. That pays when a batch touches a small part of the slots (at the released English
        shape a 32 x 32 batch touches 37 % of them, and dense fused AdamW is the faster). Dense gradients stay the
        default because every optimizer, gradient clipping and `Trainer` accept them; ``node_bias`` and
        ``positions`` are always dense. Sparse gradients need an optimizer that takes them:
        ``modeling_brillm.optimization.LazyAdamW`` (AdamW on the touched rows only), `torch.optim.SGD`, or
        `torch.optim.SparseAdam` (slow); `torch.optim.AdamW`, gradient clipping and `Trainer` refuse them. The
        setting is not saved with the model.
        """
        self.base_model.sparse_gradients = enabled

    def save_pretrained(self, save_directory, *args, **kwargs):
        # One checkpoint serves AutoConfig, AutoModel and AutoModelForCausalLM as remote code.
        self.config.auto_map = {
            "AutoConfig": "configuration_brillm.BriLLMConfig",
            "AutoModel": "modeling_brillm.BriLLMModel",
            "AutoModelForCausalLM": "modeling_brillm.BriLLMForCausalLM",
        }
        return super().save_pretrained(save_directory, *args, **kwargs)


class BriLLMModel(BriLLMPreTrainedModel):
    r"""The BriLLM graph: node biases, edge slots, positional weights, and the signal recurrence.

    Parameters (names and shapes of the reference checkpoint):
    ``weights`` (P, d, d) edge matrices applied as ``x @ W``; ``biases`` (P, 1, d); ``node_bias`` (V, 1, d),
    used only to start the signal at a text's first token; ``positions`` (1, max_position_embeddings, 1), the
    logits of the softmax that weights earlier edge energies. The slot map is ``graph`` (`BriLLMEdgeGraph`).

    ``forward`` returns the signal leaving each token (``last_hidden_state``) and the energies of the path
    travelled; with ``logits_to_keep`` it also scores the next token (what `BriLLMForCausalLM` asks: every read of
    the parameters happens inside this forward, as sharding wrappers such as FSDP require). `score_next` scores
    given signals.

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
    >>> model(torch.tensor([[1, 2, 3]]), logits_to_keep=1).logits.shape  # the token after 1 2 3
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

    def train(self, mode=True):
        if not mode:  # the gradient storage kept between training steps (graph_brillm.zeroed_gradient) is let go
            forget_gradients(self.weights, self.biases)
        return super().train(mode)

    def extra_repr(self):
        shapes = ", ".join(f"{name}={tuple(p.shape)}" for name, p in self.named_parameters(recurse=False))
        c = self.config
        return (
            f"vocab_size={c.vocab_size}, hidden_size={c.hidden_size}, num_slots={c.num_slots}, "
            f"max_position_embeddings={c.max_position_embeddings}, parameters={self.num_parameters():,}: {shapes}"
        )

    def forward(
        self,
        input_ids=None,
        attention_mask=None,
        past_key_values=None,
        cache=None,
        use_cache=None,
        output_hidden_states=None,
        return_dict=None,
        logits_to_keep=None,
        labels=None,
        **kwargs,
    ):
        r"""
        logits_to_keep (`int` or `torch.Tensor`, *optional*):
            Also score the next token of the last ``logits_to_keep`` positions (0: all), or of the given column
            indices; the scores are ``logits`` of the output. Without it nothing is scored.
        labels (`torch.Tensor`, *optional*):
            Causal-LM labels (B, T) as `BriLLMForCausalLM` takes them. On a training step where the Triton kernels
            run (``kernels_brillm.kernels_wanted``), the output's ``loss`` is their loss, computed without logits
            (``logits`` is then None); anywhere else they are ignored here.
        """
        self.graph.check()
        cache = _pick_cache(past_key_values, cache)
        output_hidden_states, return_dict = _output_options(self.config, output_hidden_states, return_dict)
        if logits_to_keep is not None and not output_hidden_states and not torch.is_grad_enabled():
            logits = self._decode_step(input_ids, attention_mask, cache)
            if logits is not None:  # generation's lean path, same numbers
                output = BriLLMModelOutput(logits=logits[:, None].float(), cache=None if use_cache is False else cache)
                return output if return_dict else output.to_tuple()
        mask = self._check_inputs(input_ids, attention_mask, cache)
        if use_cache is None:  # the state is O(d) per text, but training has no use for it
            use_cache = self.config.use_cache and not self.training
        if cache is None:
            cache = BriLLMCache()
        if not cache.is_initialized:
            dtype = compute_dtype(self.weights.dtype)
            cache.initialize(input_ids.shape[0], self.config.hidden_size, input_ids.device, dtype)
        link = None  # the arriving-edge gather's gradient: sparse when asked, shared with the scoring's
        if torch.is_grad_enabled() and (self.weights.requires_grad or self.biases.requires_grad):
            link = GradientLink(self.sparse_gradients, self.weights)
        edges = self._edge_inputs(input_ids, mask, cache, link)
        past = cache.seen_positions
        signals, energies = flow(cache, edges)
        signal_positions = torch.where(mask, edges.tokens_before, torch.full_like(edges.tokens_before, -1))
        logits = loss = None
        if labels is not None and kernel_loss_wanted(signals, logits_to_keep, kwargs):
            loss = next_token_loss(
                self.graph, self.weights, self.biases, input_ids, signals, signal_positions, labels,
                self.config.position_shift, past, self.sparse_gradients, link, **kwargs,
            )  # fmt: skip
        elif logits_to_keep is not None:
            keep = slice(-logits_to_keep, None) if isinstance(logits_to_keep, int) else logits_to_keep
            logits = self._logits(input_ids[:, keep], signals[:, keep], signal_positions[:, keep], link)
        output = BriLLMModelOutput(
            last_hidden_state=signals,
            energies=energies,
            signal_positions=signal_positions,
            cache=cache if use_cache else None,
            hidden_states=(signals,) if output_hidden_states else None,
            logits=logits,
            loss=loss,
        )
        return output if return_dict else output.to_tuple()

    def score_next(self, sources, signals, signal_positions):
        """Full-vocabulary next-token logits: (B, T, V) from sources (B, T), signals (B, T, d), edge indices (B, T).

        ``logits[b, t, v] = ||GELU(x W[slot(u, v)] + b[slot(u, v)] + PE[i + position_shift])||`` with
        ``u = sources[b, t]``, ``x = signals[b, t]``, ``i = signal_positions[b, t]``. Every shared target of
        ``u`` takes the one shared-slot score; owned targets are scored one source slab at a time. Positions
        with ``signal_positions < 0`` (padding) get all-zero logits.
        """
        self.graph.check()
        return self._logits(sources, signals, signal_positions)

    def _logits(self, sources, signals, signal_positions, link=None):
        return next_token_logits(
            self.graph, self.weights, self.biases, sources, signals, signal_positions,
            self.config.position_shift, self.sparse_gradients, link,
        )  # fmt: skip

    def _check_inputs(self, input_ids, attention_mask, cache):
        """The chunk's mask (B, T) bool, after checking ids, mask and cache; `ValueError` on bad input."""
        if input_ids is None:
            raise ValueError("BriLLM needs input_ids (B, T) of token ids; inputs_embeds are not supported.")
        if not isinstance(input_ids, torch.Tensor):
            raise ValueError(f"input_ids must be an integer tensor of token ids; got {type(input_ids).__name__}.")
        if input_ids.dtype not in (torch.int64, torch.int32):  # uint8 would even index as a mask
            raise ValueError(
                f"input_ids must be an integer tensor of int64 or int32 token ids; got {input_ids.dtype}: "
                "use input_ids.long()."
            )
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
            return torch.ones_like(input_ids, dtype=torch.bool)
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
        return mask.bool()

    def _edge_inputs(self, input_ids, mask, cache, link):
        """The `EdgeInputs` of a chunk: for every token, the edge that arrives at it from the previous real token
        of its text (in the chunk or the cache), gathered in one go (per-step indexing of a Parameter would cost a
        full-size gradient per step)."""
        B, T = input_ids.shape
        d, V, shift = self.config.hidden_size, self.config.vocab_size, self.config.position_shift
        compute, device = cache.signal.dtype, input_ids.device
        steps = mask.long()
        tokens_before = cache.num_tokens[:, None] + torch.cumsum(steps, 1) - steps  # (B, T)
        column = torch.arange(T, device=device).expand(B, T)
        last_real = torch.cummax(torch.where(mask, column, torch.full_like(column, -1)), dim=1).values
        prev_column = torch.cat([torch.full_like(last_real[:, :1], -1), last_real[:, :-1]], dim=1)
        prev_token = torch.where(
            prev_column >= 0, input_ids.gather(1, prev_column.clamp(min=0)), cache.last_token[:, None]
        )
        arriving_edge = (tokens_before - 1).clamp(min=0)  # (B, T) index of the edge that arrives at each token
        slots = self.graph.slots(prev_token.clamp(min=0), input_ids).reshape(-1)
        pe_table = sinusoidal_positions(int(arriving_edge.max()) + max(shift, 1) + 1, d, device).to(compute)
        max_learned = self.config.max_position_embeddings - 1
        return EdgeInputs(
            tokens=input_ids,
            mask=mask,
            tokens_before=tokens_before,
            start=gelu(1.0 / d + self.node_bias.view(V, d)[input_ids].to(compute) + pe_table[0]),
            weights=gather_slots(self.weights, slots, link, "weights").view(B, T, d, d).to(compute),
            biases=gather_slots(self.biases, slots, link, "biases").view(B, T, d).to(compute),
            pe=pe_table[arriving_edge + shift],
            logits=self.positions.view(-1)[arriving_edge.clamp(max=max_learned)].to(compute),
        )

    def _decode_step(self, input_ids, attention_mask, cache):
        """Advance ``cache`` by one token per text and score the next one: logits (B, V), no autograd.

        Generation's lean path, equal to `forward` with ``logits_to_keep`` on a (B, 1) chunk whose texts all hold a
        token already: one gather of the arriving edges, one running-softmax update, one scoring plan. Returns None,
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
        weights, biases = self.weights[slots].to(compute), self.biases[slots, 0].to(compute)
        energy = edge_energy(cache.signal, weights, biases, pe[edge + shift])  # (B, d)
        logit = self.positions.view(-1)[edge.clamp(max=self.config.max_position_embeddings - 1)].to(compute)
        numerator, denominator, max_logit = accumulate(cache.numerator, cache.denominator, cache.max_logit, energy, logit)
        cache.advance(
            signal=numerator / denominator[:, None],
            numerator=numerator,
            denominator=denominator,
            max_logit=max_logit,
            last_token=token,
            num_tokens=cache.num_tokens + 1,
        )
        return score(self.graph, self.weights, self.biases, plan_scoring(self.graph, token), cache.signal, pe[edge + 1 + shift])

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
        return True

    def _decode_one(self, token, cache):
        """`_decode_step` for one text on the CPU, its scalars on the host; None for what it does not take.

        In generation each tensor operation costs several microseconds, as much as the slab read of a small node:
        the running softmax's scalars are Python floats (`accumulate_one`) and the slot is a host look-up. Weights
        in another precision than the cache's go the general way.
        """
        config, graph, weights, biases = self.config, self.graph, self.weights, self.biases
        V, d, shift = config.vocab_size, config.hidden_size, config.position_shift
        source, target, before = int(cache.last_token), int(token), int(cache.num_tokens)  # arriving edge before - 1
        signal = cache.signal
        if not (0 <= target < V and before > 0) or weights.dtype != signal.dtype:
            return None
        pe = sinusoidal_positions(before + shift + 1, d, token.device).to(signal.dtype)
        slot = graph.slot(source, target)
        energy = edge_energy(signal, weights[slot : slot + 1], biases[slot], pe[before - 1 + shift : before + shift])
        logit = float(self.positions.view(-1)[min(before - 1, config.max_position_embeddings - 1)])
        numerator, denominator, max_logit = accumulate_one(
            cache.numerator, float(cache.denominator), float(cache.max_logit), energy, logit
        )
        scalars = torch.tensor([denominator, max_logit], dtype=signal.dtype)
        cache.advance(
            signal=numerator / scalars[0],
            numerator=numerator,
            denominator=scalars[:1],
            max_logit=scalars[1:],
            last_token=token.view(1),
            num_tokens=cache.num_tokens + 1,
        )
        return score_one(graph, weights, biases, target, cache.signal, pe[before + shift : before + shift + 1])


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
        output_hidden_states, return_dict = _output_options(self.config, output_hidden_states, return_dict)
        if labels is not None:
            self._check_labels(labels, input_ids)
        outputs = self.model(
            input_ids,
            attention_mask=attention_mask,
            past_key_values=past_key_values,
            cache=cache,
            use_cache=use_cache,
            output_hidden_states=output_hidden_states,
            return_dict=True,
            logits_to_keep=logits_to_keep,
            labels=labels,
            **kwargs,
        )
        loss = outputs.loss  # set when the Triton kernels computed it (a training step; no logits then)
        if labels is not None and loss is None:
            loss = self.loss_function(logits=outputs.logits, labels=labels, vocab_size=self.config.vocab_size, **kwargs)
        output = CausalLMOutputWithPast(
            loss=loss, logits=outputs.logits, past_key_values=outputs.cache, hidden_states=outputs.hidden_states
        )
        return output if return_dict else output.to_tuple()

    def _check_labels(self, labels, input_ids):
        if not isinstance(input_ids, torch.Tensor) or labels.shape != input_ids.shape:
            shape = tuple(input_ids.shape) if isinstance(input_ids, torch.Tensor) else None
            raise ValueError(f"labels must have the shape of input_ids {shape}; got {tuple(labels.shape)}.")
        bad = (labels != -100) & ((labels < 0) | (labels >= self.config.vocab_size))
        if bool(bad.any()):
            raise ValueError(
                f"labels contains {int(labels[bad][0])}: use token ids in [0, {self.config.vocab_size}) "
                "or -100 for positions to ignore."
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


def _output_options(config, output_hidden_states, return_dict):
    """``(output_hidden_states, return_dict)``: the arguments, else the config's settings."""
    if output_hidden_states is None:
        output_hidden_states = config.output_hidden_states
    return output_hidden_states, config.return_dict if return_dict is None else return_dict


def _pick_cache(past_key_values, cache):
    """The state passed under either name (``cache`` from transformers 5.24, ``past_key_values`` before)."""
    for state in (cache, past_key_values):
        if isinstance(state, BriLLMCache):
            return state
    return None  # nothing, or a foreign cache object such as an empty DynamicCache: start fresh


# Whether the running `from_pretrained` call returns its loading info (then missing weights are reported, not silent).
_MISSING_WEIGHTS_REPORTED = contextvars.ContextVar("brillm_missing_weights_reported", default=False)


def _check_checkpoint_fits_config(model, load_config, loading_info):
    """Raise `ValueError` when the checkpoint's tensors do not fit the config the model was built from.

    transformers would re-initialise a tensor whose shape differs (after an unhelpful `RuntimeError`, or
    silently with ``ignore_mismatched_sizes=True``) and leave absent buffers as uninitialised memory. The edge
    matrices, node biases and slot map only mean something together, so a mismatch there is always an error;
    ``positions`` may still be re-initialised on request (``ignore_mismatched_sizes=True``). A missing slot map is
    an error only for a sparse graph: `_init_weights` rebuilds a dense one from the config.
    """
    config = model.config
    prefix = model.base_model_prefix + "."
    problems, saved = [], {}
    no_checkpoint = getattr(load_config, "pretrained_model_name_or_path", "") is None
    missing_allowed = no_checkpoint or _MISSING_WEIGHTS_REPORTED.get()
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
        if name.startswith("graph.") and not config.is_dense:  # a dense slot map follows from the config
            problems.append(f"{key} (the slot map of this sparse graph) is missing from the checkpoint")
        elif name in ("weights", "biases", "node_bias", "positions") and not missing_allowed:
            problems.append(f"{key} is missing from the checkpoint")  # never re-initialised at random in silence
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

__all__ = ["BriLLMForCausalLM", "BriLLMModel", "BriLLMModelOutput", "BriLLMPreTrainedModel"]
