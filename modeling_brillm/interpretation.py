"""Seeing the signal: where it flows, which edges let energy through, and how earlier energies are weighted.

Every BriLLM node is a token and every edge an inspectable map, so a prediction can be read off the graph:

* `trace_signal` follows a text edge by edge: the source node, the signal's norm, the positional weights that
  mixed earlier energies into the signal, the top candidates (energy, probability, owned or shared edge) and
  how the true next token ranked.
* `edge_report` lists the strongest outgoing edges of one node from its neutral starting signal.
* ``plot_*`` draw these with matplotlib (optional: ``pip install matplotlib``).

The CLI writes all plots of one text: ``brillm trace MODEL_DIR --text "..." --out trace.png``.
"""

import math
from dataclasses import dataclass, field

import torch


@dataclass
class Candidate:
    """One possible next node: its id and text, the energy its edge lets through (the logit), its probability."""

    token_id: int
    token: str
    energy: float
    probability: float
    owned: bool  # the edge has its own slot (False: it shares slot 0 with every unseen edge of the source)


@dataclass
class TraceStep:
    """What happens on the edge that leaves ``input_ids[position]``."""

    position: int
    source_id: int
    source: str
    signal_norm: float
    positional_weights: list  # weight of each earlier edge's energy in this signal (empty: the start signal)
    candidates: list  # top-k `Candidate`, best first
    next_id: int | None = None  # the token that really follows, if any
    next_token: str | None = None
    next_rank: int | None = None  # 1 = the model's first choice
    next_probability: float | None = None


@dataclass
class SignalTrace:
    """A text's path through the graph: one `TraceStep` per token (the last one predicts beyond the text)."""

    text: str
    token_ids: list
    tokens: list
    steps: list = field(default_factory=list)

    def path_probability(self):
        """Log-probability (nats) of the text's own path, token 2 onwards."""
        return sum(math.log(step.next_probability) for step in self.steps if step.next_probability is not None)


def positional_weights(model, num_edges):
    """Softmax weights of the first ``num_edges`` edge energies in the signal leaving the next token: (num_edges,).

    Edges past the learned positions reuse the last learned logit (as the model does).

    Example:

    ```python
    >>> from modeling_brillm import BriLLMConfig, BriLLMForCausalLM
    >>> model = BriLLMForCausalLM(BriLLMConfig(vocab_size=8, hidden_size=4))
    >>> positional_weights(model, 4).tolist()  # reference init: all logits equal, a plain mean
    [0.25, 0.25, 0.25, 0.25]

    ```
    """
    learned = model.base_model.positions.detach().view(-1).float()
    index = torch.arange(num_edges).clamp(max=learned.numel() - 1)
    return torch.softmax(learned[index], dim=0) if num_edges else learned.new_zeros(0)


@torch.no_grad()
def trace_signal(model, tokenizer, texts, top_k=10):
    """Trace one text (returns a `SignalTrace`) or a list of texts (returns a list).

    Probabilities are the model's softmaxed full-vocabulary logits; energies are the logits themselves.

    Example:

    ```python
    >>> from modeling_brillm import BriLLMConfig, BriLLMForCausalLM
    >>> from modeling_brillm.tokenization_brillm import character_tokenizer
    >>> tokenizer = character_tokenizer({"<unk>": 0, "a": 1, "b": 2, "c": 3})
    >>> model = BriLLMForCausalLM(BriLLMConfig(vocab_size=4, hidden_size=4)).eval()
    >>> trace = trace_signal(model, tokenizer, "abc", top_k=2)
    >>> [step.source for step in trace.steps], trace.steps[0].next_token, len(trace.steps[1].positional_weights)
    (['a', 'b', 'c'], 'b', 1)

    ```
    """
    single = isinstance(texts, str)
    traces = [_trace_one(model, tokenizer, text, top_k) for text in ([texts] if single else texts)]
    return traces[0] if single else traces


def _trace_one(model, tokenizer, text, top_k):
    ids = tokenizer(text, add_special_tokens=False)["input_ids"]
    if not ids:
        raise ValueError(f"the text {text!r} has no tokens to trace.")
    input_ids = torch.tensor([ids])
    out = model(input_ids, use_cache=False, output_hidden_states=True)
    logits, signals = out.logits[0].float(), out.hidden_states[0][0]  # (L, V), (L, d)
    probabilities = torch.softmax(logits, dim=-1)
    graph = model.get_edge_graph()
    tokens = tokenizer.convert_ids_to_tokens(ids)
    trace = SignalTrace(text=text, token_ids=ids, tokens=tokens)
    k = min(top_k, logits.shape[-1])
    for position, source in enumerate(ids):
        top = torch.topk(logits[position], k)
        owned = graph.slots(torch.full((k,), source), top.indices) > 0
        candidates = [
            Candidate(int(t), tokenizer.convert_ids_to_tokens(int(t)), float(e), float(probabilities[position, t]), bool(o))
            for t, e, o in zip(top.indices, top.values, owned)
        ]
        step = TraceStep(
            position=position,
            source_id=source,
            source=tokens[position],
            signal_norm=float(signals[position].norm()),
            positional_weights=positional_weights(model, position).tolist(),
            candidates=candidates,
        )
        if position + 1 < len(ids):
            target = ids[position + 1]
            step.next_id, step.next_token = target, tokens[position + 1]
            step.next_probability = float(probabilities[position, target])
            step.next_rank = int((logits[position] > logits[position, target]).sum()) + 1
        trace.steps.append(step)
    return trace


@torch.no_grad()
def edge_report(model, tokenizer, source_token, top_k=10):
    """The strongest outgoing edges of a node, scored from the signal a text starting at that node carries.

    Returns ``{"source", "source_id", "owned_edges", "shared_energy", "edges": [Candidate, ...]}``;
    ``shared_energy`` is the one energy every edge without its own slot lets through.

    Example:

    ```python
    >>> from modeling_brillm import BriLLMConfig, BriLLMForCausalLM
    >>> from modeling_brillm.tokenization_brillm import character_tokenizer
    >>> tokenizer = character_tokenizer({"<unk>": 0, "a": 1, "b": 2})
    >>> model = BriLLMForCausalLM(BriLLMConfig(vocab_size=3, hidden_size=4)).eval()
    >>> report = edge_report(model, tokenizer, "a", top_k=3)
    >>> report["owned_edges"], len(report["edges"])  # a dense graph: every edge owns a slot
    (3, 3)

    ```
    """
    source = source_token if isinstance(source_token, int) else tokenizer.convert_tokens_to_ids(source_token)
    if source is None or not 0 <= source < model.config.vocab_size:
        raise ValueError(f"{source_token!r} is not a node of this model's vocabulary.")
    logits = model(torch.tensor([[source]]), use_cache=False).logits[0, 0].float()
    probabilities = torch.softmax(logits, dim=-1)
    graph = model.get_edge_graph()
    k = min(top_k, logits.numel())
    top = torch.topk(logits, k)
    owned = graph.slots(torch.full((k,), source), top.indices) > 0
    shared = graph.slots(torch.full((logits.numel(),), source), torch.arange(logits.numel())) == 0
    return {
        "source": tokenizer.convert_ids_to_tokens(source),
        "source_id": source,
        "owned_edges": int(graph.degrees()[source]),
        "shared_energy": float(logits[shared][0]) if bool(shared.any()) else None,
        "edges": [
            Candidate(int(t), tokenizer.convert_ids_to_tokens(int(t)), float(e), float(probabilities[t]), bool(o))
            for t, e, o in zip(top.indices, top.values, owned)
        ],
    }


# ----------------------------------------------------------------------------------------------------------------
# Plots


def _pyplot():
    try:  # the user's backend as it is: inline in Jupyter, a window on a desktop, Agg when headless
        import matplotlib.pyplot as plt
    except ImportError:
        raise ImportError("plotting needs matplotlib: pip install matplotlib") from None
    return plt


def plot_energy_heatmap(trace, ax=None, top_k=8):
    """Steps × top candidates, coloured by energy, labelled with the candidate tokens (true next token in bold)."""
    plt = _pyplot()
    ax = ax or plt.subplots(figsize=(1.2 * top_k + 2, 0.45 * len(trace.steps) + 1.5))[1]
    k = min(top_k, len(trace.steps[0].candidates))
    energies = [[c.energy for c in step.candidates[:k]] for step in trace.steps]
    image = ax.imshow(energies, aspect="auto", cmap="magma")
    for row, step in enumerate(trace.steps):
        for col, candidate in enumerate(step.candidates[:k]):
            weight = "bold" if candidate.token_id == step.next_id else "normal"
            ax.text(col, row, _show(candidate.token), ha="center", va="center", fontsize=7, color="cyan", weight=weight)
    ax.set_yticks(range(len(trace.steps)), [_show(step.source) for step in trace.steps], fontsize=8)
    ax.set_xticks(range(k), [f"#{i + 1}" for i in range(k)], fontsize=8)
    ax.set_xlabel("candidates, best first")
    ax.set_ylabel("source node")
    ax.set_title("energy each edge lets through")
    ax.figure.colorbar(image, ax=ax, label="energy (logit)")
    return ax


def plot_path(trace, ax=None):
    """The text's own path: the probability the model gave each next token, with its rank."""
    plt = _pyplot()
    ax = ax or plt.subplots(figsize=(max(6, 0.5 * len(trace.steps)), 3.5))[1]
    steps = [step for step in trace.steps if step.next_id is not None]
    ax.bar(range(len(steps)), [step.next_probability for step in steps], color="tab:blue")
    for i, step in enumerate(steps):
        ax.text(i, step.next_probability, f"#{step.next_rank}", ha="center", va="bottom", fontsize=7)
    ax.set_xticks(range(len(steps)), [f"{_show(s.source)}→{_show(s.next_token)}" for s in steps], rotation=60, fontsize=7)
    ax.set_ylabel("probability of the true next token")
    ax.set_title("path through the graph (rank above each bar)")
    return ax


def plot_positional_weights(model, num_edges=32, ax=None):
    """How the signal leaving the token after ``num_edges`` edges weights each earlier edge's energy."""
    plt = _pyplot()
    ax = ax or plt.subplots(figsize=(6, 3))[1]
    shares = positional_weights(model, num_edges)  # (num_edges,) softmax weights, summing to 1
    ax.plot(range(num_edges), shares.tolist(), marker="o", markersize=3)
    ax.set_xlabel("earlier edge (position)")
    ax.set_ylabel("weight in the signal")
    ax.set_title(f"positional weighting after {num_edges} edges")
    return ax


def plot_out_degrees(model, ax=None):
    """Distribution of owned out-edges per node (log-scaled counts)."""
    plt = _pyplot()
    ax = ax or plt.subplots(figsize=(6, 3))[1]
    degrees = model.get_edge_graph().degrees().tolist()
    ax.hist(degrees, bins=min(50, max(degrees) + 1 if degrees else 1), log=True, color="tab:green")
    ax.set_xlabel("owned out-edges of a node")
    ax.set_ylabel("nodes")
    ax.set_title(f"out-degrees ({sum(degrees):,} owned edges, {len(degrees):,} nodes)")
    return ax


def plot_trace(model, trace, path):
    """All four plots of a trace in one PNG."""
    plt = _pyplot()
    figure, axes = plt.subplots(2, 2, figsize=(15, 10))
    plot_energy_heatmap(trace, axes[0][0])
    plot_path(trace, axes[0][1])
    plot_positional_weights(model, max(2, len(trace.steps)), axes[1][0])
    plot_out_degrees(model, axes[1][1])
    figure.tight_layout()
    figure.savefig(path, dpi=110)
    plt.close(figure)
    return path


def _show(token):
    return token.replace("\u0120", "·").replace("\n", "⏎") if token else "?"


def run(args):
    from transformers import AutoModelForCausalLM, AutoTokenizer

    model = AutoModelForCausalLM.from_pretrained(args.model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(args.model_dir)
    trace = trace_signal(model, tokenizer, args.text, top_k=args.top_k)
    for step in trace.steps:
        best = ", ".join(f"{_show(c.token)} {c.probability:.2f}" for c in step.candidates[:3])
        truth = f"next {_show(step.next_token)} rank {step.next_rank} p={step.next_probability:.3f}" if step.next_id is not None else ""
        print(f"{step.position:3d} {_show(step.source):>10}  |x|={step.signal_norm:.2f}  top: {best}  {truth}")
    print(f"wrote {plot_trace(model, trace, args.out)}")


def build_parser(parser):
    parser.add_argument("model_dir", help="a save_pretrained folder with a tokenizer")
    parser.add_argument("--text", required=True, help="the text to trace")
    parser.add_argument("--out", default="trace.png", help="PNG with the four plots")
    parser.add_argument("--top-k", type=int, default=10)
    return parser
