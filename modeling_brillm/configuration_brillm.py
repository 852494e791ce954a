"""Configuration of a BriLLM model (arXiv 2503.11299).

This file is copied next to the weights by ``save_pretrained`` and loaded as remote code, so it imports
only the standard library and transformers.
"""

from transformers import PretrainedConfig


class BriLLMConfig(PretrainedConfig):
    r"""Configuration of a BriLLM graph language model.

    Every token is a node; every directed edge ``u -> v`` maps a signal ``x`` (width ``hidden_size``) to an
    energy ``GELU(x @ W + b + PE)``. Edges seen in training own a parameter *slot*; all other edges share
    slot 0. The slot map itself (which edges own a slot) is stored as CSR buffers with the weights, not in
    this config: the config only records how many slots there are.

    Args:
        vocab_size (`int`, defaults to 4000):
            Number of nodes (tokens). Must be at least 2.
        hidden_size (`int`, defaults to 32):
            Width ``d`` of a node's signal and of every edge matrix (``d x d``). Must be even (the sinusoidal
            positional encoding interleaves sines and cosines).
        max_position_embeddings (`int`, defaults to 512):
            Number of learned positional weights (the softmax logits that weight earlier edge energies).
            Reference models use 512. Longer texts are still accepted: edges past the last learned position
            reuse its weight, and the sinusoidal encoding simply continues.
        num_slots (`int`, *optional*):
            Number of parameter slots ``P``, the shared slot 0 included, i.e. ``1 + number of owned edges``.
            Defaults to the dense graph, ``1 + vocab_size**2`` (every edge owns a slot, slot 0 unused).
        position_shift (`int`, defaults to 1):
            The edge leaving the ``i``-th token (counting from 0) adds ``PE[i + position_shift]``. The reference
            forward (training) uses 1 and the reference decoder uses 0.
        suppress_self_loop (`bool`, defaults to `False`):
            If `True`, ``generate`` never proposes the current token as the next one (the reference decoder's
            behaviour). Forward logits are never masked.
        initializer_range (`float`, defaults to 0.5):
            Edge matrices, edge biases and node biases start uniform in ``[-initializer_range, initializer_range]``
            (the reference init).
        position_init (`float`, defaults to 1.0):
            Initial value of every positional weight logit (the reference starts them all at 1).
        pad_token_id (`int`, *optional*):
            Padding token id. Positions masked out by ``attention_mask`` never advance the signal.
        bos_token_id (`int`, *optional*):
            Beginning-of-text token id, if the tokenizer has one (the released models have none).
        eos_token_id (`int`, *optional*):
            End-of-text token id; ``generate`` stops on it. The released models have none.
        unk_token_id (`int`, *optional*):
            Unknown-token id of the tokenizer, recorded for tools that inspect the vocabulary.
        context_length (`int`, *optional*):
            Length in tokens of the texts the model was trained on (32 for the reference models and `brillm
            prepare`'s default). Longer texts still work, but positional weights past it keep their initial value.
            Tools that size their windows from the config see it as ``n_positions`` (lm-evaluation-harness reads
            ``n_positions`` before ``max_position_embeddings``), so evaluation matches training unless asked for
            more. `None` (folders written before it existed): they see ``max_position_embeddings``.
        use_cache (`bool`, defaults to `True`):
            Whether a forward pass in eval mode returns the generation state (a `BriLLMCache`, O(d) per text) as
            ``past_key_values``; ``generate`` continues from it. Training forwards never return it unless asked.

    Example:

    ```python
    >>> from modeling_brillm import BriLLMConfig
    >>> config = BriLLMConfig(vocab_size=64, hidden_size=8)
    >>> config.num_slots  # dense graph: every edge owns a slot, plus the shared slot 0
    4097
    >>> BriLLMConfig(vocab_size=64, hidden_size=7)
    Traceback (most recent call last):
    ...
    ValueError: hidden_size must be even (the positional encoding pairs sines and cosines); got 7, use 6 or 8.

    ```
    """

    model_type = "brillm"
    attribute_map = {"n_positions": "context_length"}
    keys_to_ignore_at_inference = ["past_key_values", "cache"]

    def __init__(
        self,
        vocab_size=4000,
        hidden_size=32,
        max_position_embeddings=512,
        num_slots=None,
        position_shift=1,
        suppress_self_loop=False,
        initializer_range=0.5,
        position_init=1.0,
        pad_token_id=None,
        bos_token_id=None,
        eos_token_id=None,
        unk_token_id=None,
        context_length=None,
        use_cache=True,
        **kwargs,
    ):
        _check_int("vocab_size", vocab_size, minimum=2, hint="a graph needs at least two nodes")
        _check_int("hidden_size", hidden_size, minimum=2, hint="the signal needs at least one sine/cosine pair")
        if hidden_size % 2:
            raise ValueError(
                "hidden_size must be even (the positional encoding pairs sines and cosines); "
                f"got {hidden_size}, use {hidden_size - 1} or {hidden_size + 1}."
            )
        _check_int("max_position_embeddings", max_position_embeddings, minimum=1, hint="reference models use 512")
        dense_slots = 1 + vocab_size * vocab_size
        if num_slots is None:
            num_slots = dense_slots
        _check_int("num_slots", num_slots, minimum=1, hint="slot 0 (the shared slot) always exists")
        if num_slots > dense_slots:
            raise ValueError(
                f"num_slots={num_slots} exceeds the dense graph's 1 + vocab_size**2 = {dense_slots}: "
                "a graph cannot own more edges than there are node pairs."
            )
        _check_int("position_shift", position_shift, minimum=0, hint="1 for the reference forward, 0 for its decoder")
        if not isinstance(suppress_self_loop, bool):
            raise ValueError(f"suppress_self_loop must be True or False; got {suppress_self_loop!r}.")
        if not initializer_range > 0:
            raise ValueError(f"initializer_range must be positive (reference: 0.5); got {initializer_range}.")
        for name, token_id in (
            ("pad_token_id", pad_token_id),
            ("bos_token_id", bos_token_id),
            ("unk_token_id", unk_token_id),
        ):
            if token_id is not None and not 0 <= token_id < vocab_size:
                raise ValueError(f"{name}={token_id} is not a node id: it must lie in [0, vocab_size={vocab_size}).")

        self.vocab_size = vocab_size
        self.hidden_size = hidden_size
        self.max_position_embeddings = max_position_embeddings
        self.num_slots = num_slots
        self.position_shift = position_shift
        self.suppress_self_loop = suppress_self_loop
        self.initializer_range = initializer_range
        self.position_init = position_init
        self.unk_token_id = unk_token_id
        if context_length is not None:
            _check_int("context_length", context_length, minimum=1, hint="the training sample length, e.g. 32")
        self.context_length = context_length
        if not isinstance(use_cache, bool):
            raise ValueError(f"use_cache must be True or False; got {use_cache!r}.")
        self.use_cache = use_cache
        # Token ids go through super().__init__: transformers 4.x re-assigns them there from kwargs.
        kwargs.setdefault("tie_word_embeddings", False)
        super().__init__(pad_token_id=pad_token_id, bos_token_id=bos_token_id, eos_token_id=eos_token_id, **kwargs)

    @property
    def num_own_edges(self):
        """Number of edges that own a slot (every slot but the shared slot 0)."""
        return self.num_slots - 1

    @property
    def is_dense(self):
        """Whether every edge owns a slot."""
        return self.num_slots == 1 + self.vocab_size * self.vocab_size


def count_parameters(vocab_size, hidden_size, num_slots, max_position_embeddings):
    """Parameters of a BriLLM: a ``d x d`` matrix and a bias per slot, a bias per node, a logit per learned position.

    Example:

    ```python
    >>> count_parameters(vocab_size=4000, hidden_size=32, num_slots=906998, max_position_embeddings=512)
    957918400

    ```
    """
    d = hidden_size
    return num_slots * (d * d + d) + vocab_size * d + max_position_embeddings


def _check_int(name, value, minimum, hint):
    if isinstance(value, bool) or not isinstance(value, int) or value < minimum:
        raise ValueError(f"{name} must be an integer >= {minimum} ({hint}); got {value!r}.")


BriLLMConfig.register_for_auto_class()

__all__ = ["BriLLMConfig", "count_parameters"]
