"""``brillm prepare``: a folder of text in, everything a BriLLM pre-training run needs out.

Layout of the output folder ``DIR`` (the contract the training code relies on):

| path | what | load it with |
| --- | --- | --- |
| ``DIR/model/`` | the initialised model (reference init on the corpus graph; ``pad_token_id``/``unk_token_id`` from the tokenizer), its remote code, and a copy of the tokenizer | ``BriLLMForCausalLM.from_pretrained(DIR / "model")`` |
| ``DIR/tokenizer/`` | ``tokenizer.json`` + ``tokenizer_config.json`` (also in ``DIR/model/``) | ``AutoTokenizer.from_pretrained(DIR / "tokenizer")`` |
| ``DIR/dataset/`` | `DatasetDict` with splits ``train`` and ``validation``; columns ``input_ids`` (int64 ``[seq_len]``), ``attention_mask`` (int8, 0 on right padding), ``labels`` (``input_ids`` with -100 on padding; shifted inside the model) and ``num_chars`` (characters covered by the sample's scored tokens: ``bits/char = sum(nats) / ln 2 / sum(num_chars)``) | ``datasets.load_from_disk(DIR / "dataset")`` |
| ``DIR/graph.json`` | graph statistics: slots, parameters, edges per source, held-out bigram coverage | ``json.load`` |
| ``DIR/prepare.json`` | the settings, corpus sizes, unknown-token rates and timings of this run | ``json.load`` |
| ``DIR/text/`` | ``train.txt`` / ``valid.txt``: the checked, normalised text everything above was built from | ``load_text(DIR / "text")`` |

The graph is counted on the training samples themselves (pairs inside a sample, padding excluded), so every
edge that training ever scores as a target has its own slot. See `modeling_brillm.data` for how text is split
into documents and packed into samples, and `modeling_brillm.graph_building` for the graph.

Example (a few seconds; `brillm prepare --corpus data/bundled/en --output DIR` is the same on the bundled corpus):

```python
>>> import tempfile
>>> from pathlib import Path
>>> folder = Path(tempfile.mkdtemp())
>>> _ = (folder / "a.txt").write_text("the cat sat on the mat\\nthe dog sat on the log\\n" * 20)
>>> report = prepare([folder / "a.txt"], folder / "out", hidden_size=4, log=None)
>>> sorted(path.name for path in (folder / "out").iterdir())
['dataset', 'graph.json', 'model', 'prepare.json', 'text', 'tokenizer']
>>> report["graph"]["num_slots"], report["graph"]["heldout"]["coverage"]
(25, 1.0)

```
"""

import json
import os
import tempfile
import time
from dataclasses import asdict, dataclass, fields
from pathlib import Path

import torch

from .configuration_brillm import BriLLMConfig
from .data import (
    MAX_ROW_CHARS,
    PACKING_MODES,
    CorpusError,
    corpus_files,
    iter_lines,
    load_text,
    tokenize_and_pack,
    write_corpus_split,
)
from .graph_building import BigramCounter, build_graph, graph_statistics
from .hub_brillm import write_model_card
from .modeling_brillm import BriLLMForCausalLM
from .output_folders import OutputFolderError, files_under, holds_anything, staged_folder
from .tokenization_brillm import save_tokenizer, train_bpe_tokenizer, train_character_tokenizer

TOKENIZERS = ("char", "bpe")
ENCODING_ERRORS = ("strict", "replace")
MANIFEST = "prepare.json"
_PARALLEL_BYTES = 4 << 20  # tokenize in worker processes only when the training text is at least this large


@dataclass(frozen=True)
class PreparationSettings:
    """What `prepare` builds, checked when made (`ValueError` for a bad value, before anything is read).

    Attributes:
        tokenizer: ``"char"`` (one token per character, ``vocab_size`` a cap) or ``"bpe"`` (byte-level BPE of
            exactly ``vocab_size`` tokens).
        seq_len, pack: sample length and packing mode (`tokenize_and_pack`).
        min_edge_count, max_edges_per_source: which bigrams own a slot (`build_graph`).
        hidden_size, max_position_embeddings: model width ``d`` and learned positions (reference: 32 and 512).
        validation_fraction: without validation files (and without a ``valid.txt``), the last fraction of the
            lines of every document is held out.
        encoding_errors: ``"strict"`` (invalid UTF-8 is an error) or ``"replace"`` (U+FFFD).
        num_proc: tokenization worker processes; default: all cores for a training text of 4 MB or more, else 1.
        seed: seed of the model's initialisation.

    Example:

    ```python
    >>> PreparationSettings(tokenizer="bpe", vocab_size=500).seq_len
    32
    >>> PreparationSettings(seq_len=1)
    Traceback (most recent call last):
    ...
    ValueError: seq_len must be an integer of at least 2; got 1.

    ```
    """

    tokenizer: str = "char"
    vocab_size: int = 4000
    seq_len: int = 32
    pack: str = "blocks"
    min_edge_count: int = 1
    max_edges_per_source: int | None = None
    hidden_size: int = 32
    max_position_embeddings: int = 512
    validation_fraction: float = 0.05
    encoding_errors: str = "strict"
    num_proc: int | None = None
    seed: int = 0

    def __post_init__(self):
        choices = {"tokenizer": TOKENIZERS, "pack": PACKING_MODES, "encoding_errors": ENCODING_ERRORS}
        for name, allowed in choices.items():
            if getattr(self, name) not in allowed:
                raise ValueError(f"{name} must be one of {allowed}; got {getattr(self, name)!r}.")
        least = {"seq_len": 2, "vocab_size": 3, "min_edge_count": 1, "hidden_size": 1}
        least |= {"max_position_embeddings": self.seq_len, "num_proc": 1, "max_edges_per_source": 0}
        for name, minimum in least.items():
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or value < minimum):
                raise ValueError(f"{name} must be an integer of at least {minimum}; got {value!r}.")
        if not 0 < self.validation_fraction < 1:
            raise ValueError(f"validation_fraction must lie strictly between 0 and 1; got {self.validation_fraction}.")


def prepare(corpus, output_dir, valid=None, log=print, **settings):
    """Build tokenizer, edge graph, initialised model and tokenized dataset from text files into ``output_dir``.

    Args:
        corpus: text files or folders (`corpus_files`). A single folder holding ``train.txt`` and ``valid.txt``
            (as ``brillm prepare-corpus`` writes) uses those two as the splits.
        output_dir: the folder to write (see the module docstring for its layout). It is built next to its place
            and swapped in at the end, so a failure leaves an earlier output as it was; an existing folder is only
            replaced when it holds nothing but an earlier output (`check_output_folder`).
        valid: validation files or folders; without them (and without a ``valid.txt``) the last
            ``validation_fraction`` of the lines of every document is held out.
        log: ``print``-like callable for progress lines, or `None`.
        settings: the fields of `PreparationSettings` (``tokenizer``, ``vocab_size``, ``seq_len``, ...), checked
            before anything is read or written.

    Returns:
        The report also written to ``prepare.json``, with the graph statistics under ``"graph"`` and the written
        files under ``"files"``.
    """
    say = log or (lambda *args: None)
    settings = PreparationSettings(**settings)
    output_dir = Path(output_dir)
    train_files, valid_files = _splits(corpus, valid)
    check_output_folder(output_dir)
    with staged_folder(output_dir) as staging:
        report = _prepare_into(staging, output_dir, train_files, valid_files, settings, say)
    say(f"done in {report['timings_s']['total']:.1f} s -> {output_dir}")
    return report


def _prepare_into(staging, output_dir, train_files, valid_files, settings, say):
    """The work of `prepare`, written into the empty folder ``staging`` (messages name ``output_dir``)."""
    timings, started = {}, time.perf_counter()

    def lap(name):
        nonlocal started
        now = time.perf_counter()
        timings[name] = round(now - started, 3)
        started = now

    corpus_summary = write_corpus_split(
        train_files, valid_files, staging / "text", settings.validation_fraction, settings.encoding_errors
    )
    say(f"corpus: {_describe(corpus_summary)} -> {output_dir / 'text'}")
    lap("text")
    tok = _write_tokenizer(staging, settings)
    capped = f" (the corpus has only {len(tok) - 2} distinct characters)" if len(tok) < settings.vocab_size else ""
    say(f"tokenizer: {settings.tokenizer}, {len(tok)} tokens{capped} -> {output_dir / 'tokenizer'}")
    lap("tokenizer")
    samples = _write_dataset(staging, tok, settings)
    sizes = f"{len(samples['train'])} train / {len(samples['validation'])} validation"
    say(f"dataset: {sizes} samples of {settings.seq_len} tokens")
    lap("dataset")
    graph, stats, unknown = _write_graph(staging, samples, tok, settings)
    say(_describe_graph(stats))
    lap("graph")
    model = _write_model(staging, graph, tok, settings)
    say(f"model: {model.num_parameters():,} parameters -> {output_dir / 'model'}")
    lap("model")
    report = {
        "settings": _recorded_settings(settings, train_files, valid_files, vocab_size=len(tok)),
        "corpus": corpus_summary,
        "samples": {name: len(samples[name]) for name in samples},
        "unknown_token_rate": unknown,
        "graph": stats,
        "timings_s": timings | {"total": round(sum(timings.values()), 3)},
        "files": sorted([*files_under(staging), MANIFEST]),  # what a later run may replace (`check_output_folder`)
    }
    (staging / MANIFEST).write_text(json.dumps(report, indent=2) + "\n", encoding="utf-8")
    return report


def _write_tokenizer(staging, settings):
    """Train the tokenizer on ``text/train.txt``; saved in ``tokenizer/`` and ``model/``."""
    lines = iter_lines(staging / "text" / "train.txt", max_chars=MAX_ROW_CHARS)
    train = train_character_tokenizer if settings.tokenizer == "char" else train_bpe_tokenizer
    tok = train(lines, vocab_size=settings.vocab_size)
    for folder in ("tokenizer", "model"):
        (staging / folder).mkdir()
        save_tokenizer(tok, staging / folder, context_length=settings.seq_len)
    return tok


def _write_dataset(staging, tok, settings):
    """Tokenize and pack ``text/`` into ``dataset/``; returns the saved `DatasetDict`, read back from disk."""
    from datasets import load_from_disk

    text_dir, num_proc = staging / "text", settings.num_proc
    if num_proc is None:
        num_proc = os.cpu_count() if (text_dir / "train.txt").stat().st_size >= _PARALLEL_BYTES else None
    with tempfile.TemporaryDirectory() as cache_dir:
        samples = tokenize_and_pack(
            load_text(text_dir, cache_dir=cache_dir), tok, settings.seq_len, settings.pack, num_proc=num_proc
        )
        samples.save_to_disk(str(staging / "dataset"))
    return load_from_disk(str(staging / "dataset"))


def _write_graph(staging, samples, tok, settings):
    """Count the samples' bigrams and build the graph on the training ones; writes ``graph.json``.

    Returns ``(graph, statistics, {split: share of unknown tokens})``."""
    counted = {name: count_sample_bigrams(samples[name], len(tok), tok.unk_token_id) for name in samples}
    counters, unknown = ({name: pair[i] for name, pair in counted.items()} for i in (0, 1))
    graph = build_graph(
        counters["train"], min_edge_count=settings.min_edge_count, max_edges_per_source=settings.max_edges_per_source
    )
    stats = graph_statistics(
        graph, settings.hidden_size, settings.max_position_embeddings, heldout=counters["validation"]
    )
    (staging / "graph.json").write_text(json.dumps(stats, indent=2) + "\n", encoding="utf-8")
    return graph, stats, unknown


def _write_model(staging, graph, tok, settings):
    """The reference-initialised model on ``graph``, saved with its model card in ``model/``."""
    config = BriLLMConfig(
        vocab_size=len(tok),
        hidden_size=settings.hidden_size,
        max_position_embeddings=settings.max_position_embeddings,
        num_slots=graph.num_slots,
        pad_token_id=tok.pad_token_id,
        unk_token_id=tok.unk_token_id,
        context_length=settings.seq_len,
    )
    model = model_from_graph(config, graph, seed=settings.seed)
    model.save_pretrained(staging / "model")
    write_model_card(staging / "model", config, made_from="Initialised (untrained) by `brillm prepare`.")
    return model


def _recorded_settings(settings, train_files, valid_files, vocab_size):
    """The ``settings`` of ``prepare.json``: the files, the tokenizer's real size beside the requested one, and
    ``validation_fraction`` only where it was used."""
    left_out = ("tokenizer", "vocab_size", "num_proc")  # (num_proc says how fast, not what was built)
    chosen = {name: value for name, value in asdict(settings).items() if name not in left_out}
    chosen["validation_fraction"] = None if valid_files else settings.validation_fraction
    files = {"corpus": [str(path) for path in train_files], "valid": [str(path) for path in valid_files]}
    sizes = {"tokenizer": settings.tokenizer, "vocab_size": vocab_size, "requested_vocab_size": settings.vocab_size}
    return files | sizes | chosen


def model_from_graph(config, graph, seed=None):
    """A reference-initialised `BriLLMForCausalLM` on an `EdgeGraph` (``config.num_slots`` and ``vocab_size`` must
    match the graph; raises `ValueError` with the values to use otherwise).

    Example:

    ```python
    >>> import numpy as np
    >>> from modeling_brillm.graph_building import build_graph
    >>> graph = build_graph((np.array([1, 5]), np.array([3, 1])), vocab_size=3)
    >>> model_from_graph(BriLLMConfig(vocab_size=3, hidden_size=2, num_slots=3), graph).num_parameters()
    536
    >>> model_from_graph(BriLLMConfig(vocab_size=4, hidden_size=2, num_slots=3), graph)
    Traceback (most recent call last):
    ...
    ValueError: the graph has 3 nodes but config.vocab_size=4: build the graph with the model's tokenizer (vocab_size=3).

    ```
    """
    if config.vocab_size != graph.vocab_size:
        raise ValueError(
            f"the graph has {graph.vocab_size} nodes but config.vocab_size={config.vocab_size}: "
            f"build the graph with the model's tokenizer (vocab_size={graph.vocab_size})."
        )
    if seed is not None:
        torch.manual_seed(seed)
    return BriLLMForCausalLM.from_graph(config, torch.from_numpy(graph.row_ptr), torch.from_numpy(graph.col_idx))


def build_parser(parser):
    """Arguments of ``brillm prepare`` (each setting is the `PreparationSettings` field of the same name)."""
    default = PreparationSettings()
    parser.add_argument("--corpus", nargs="+", required=True, help="text files or folders (e.g. data/bundled/en)")
    parser.add_argument("--output", required=True, help="folder to write (layout: see `modeling_brillm.preparation`)")
    parser.add_argument(
        "--valid", nargs="+", help="validation files or folders (default: valid.txt or a held-out tail)"
    )
    parser.add_argument("--tokenizer", choices=TOKENIZERS, default=default.tokenizer)
    parser.add_argument(
        "--vocab-size", type=int, default=default.vocab_size, help="BPE size, or the cap of a character vocabulary"
    )
    parser.add_argument("--seq-len", type=int, default=default.seq_len, help="tokens per sample (reference: 32)")
    parser.add_argument(
        "--pack", choices=PACKING_MODES, default=default.pack, help="blocks (packed) or lines (one line a sample)"
    )
    parser.add_argument(
        "--min-edge-count", type=int, default=default.min_edge_count,
        help="fewest occurrences for an edge to own a slot",
    )
    parser.add_argument("--max-edges-per-source", type=int, help="cap on the owned edges of one node")
    parser.add_argument("--hidden-size", type=int, default=default.hidden_size)
    parser.add_argument("--max-position-embeddings", type=int, default=default.max_position_embeddings)
    parser.add_argument(
        "--validation-fraction", type=float, default=default.validation_fraction, help="held-out tail of each document"
    )
    parser.add_argument("--encoding-errors", choices=ENCODING_ERRORS, default=default.encoding_errors)
    parser.add_argument("--num-proc", type=int, help="tokenization processes (default: all cores from 4 MB of text)")
    parser.add_argument("--seed", type=int, default=default.seed)


def run(args):
    """``brillm prepare``: `prepare` with the command's arguments (bad input: `ValueError`, one line)."""
    settings = {field.name: getattr(args, field.name) for field in fields(PreparationSettings)}
    prepare(args.corpus, args.output, valid=args.valid, **settings)


def _splits(corpus, valid):
    paths = [corpus] if isinstance(corpus, (str, os.PathLike)) else list(corpus)
    if valid is None and len(paths) == 1 and Path(paths[0]).is_dir():
        folder = Path(paths[0])
        if (folder / "train.txt").is_file() and (folder / "valid.txt").is_file():
            return [folder / "train.txt"], [folder / "valid.txt"]
    train_files = corpus_files(paths)
    valid_files = corpus_files(valid) if valid else []
    overlap = set(map(Path.resolve, train_files)) & set(map(Path.resolve, valid_files))
    if overlap:
        raise CorpusError(f"{sorted(overlap)[0]} is both a training and a validation file.")
    return train_files, valid_files


def count_sample_bigrams(samples, vocab_size, unk_token_id=None, batch_size=8192):
    """Bigram counts of packed samples (`tokenize_and_pack`; a `Dataset` or a streaming `IterableDataset`), read
    in batches: pairs of real tokens inside each sample. Returns ``(BigramCounter, share of real tokens that are
    unk_token_id)`` (the share is `None` without ``unk_token_id``).

    Example:

    ```python
    >>> from datasets import Dataset
    >>> samples = Dataset.from_dict({"input_ids": [[2, 3, 0, 1], [3, 2, 1, 1]], "attention_mask": [[1, 1, 1, 0], [1, 1, 0, 0]]})
    >>> counter, unknown = count_sample_bigrams(samples, vocab_size=4, unk_token_id=0)
    >>> counter.result()[0].tolist(), unknown  # keys 2*4+3, 3*4+0, 3*4+2; one of five real tokens is unknown
    ([11, 12, 14], 0.2)

    ```
    """
    counter, tokens, unknown = BigramCounter(vocab_size), 0, 0
    for batch in (
        samples.select_columns(["input_ids", "attention_mask"]).with_format("numpy").iter(batch_size=batch_size)
    ):
        ids, mask = batch["input_ids"], batch["attention_mask"].astype(bool)
        counter.update(ids, mask)
        tokens += int(mask.sum())
        if unk_token_id is not None:
            unknown += int(((ids == unk_token_id) & mask).sum())
    return counter, (unknown / tokens if tokens and unk_token_id is not None else None)


def _describe(summary):
    return ", ".join(
        f"{name} {part['documents']} documents / {part['characters']:,} characters" for name, part in summary.items()
    )


def _describe_graph(stats):
    coverage = stats["heldout"]["coverage"]
    return (
        f"graph: {stats['num_own_edges']:,} own edges, {stats['num_slots']:,} slots, {stats['num_parameters']:,} parameters "
        f"({stats['fraction_of_dense']:.2%} of dense); held-out bigram coverage "
        + ("n/a (no validation bigram)" if coverage is None else f"{coverage:.2%}")
    )


def check_output_folder(output_dir):
    """Refuse an ``output_dir`` that holds anything an earlier `prepare` did not write (its manifest, the
    ``files`` of ``prepare.json``, lists them): a file, a foreign folder, or a user's file inside a prepared one."""
    output_dir = Path(output_dir)
    if not holds_anything(output_dir):
        return
    try:
        written = set(json.loads((output_dir / MANIFEST).read_text(encoding="utf-8"))["files"])
    except (OSError, ValueError, KeyError, TypeError):
        raise OutputFolderError(
            f"{output_dir} is a non-empty folder that brillm prepare did not write (no {MANIFEST} listing its files); "
            "refusing to replace it: choose another --output or empty it yourself."
        ) from None
    foreign = [path for path in files_under(output_dir) if path not in written]
    if foreign:
        raise OutputFolderError(
            f"{output_dir / foreign[0]} was not written by brillm prepare ({len(foreign)} such file(s)); refusing to "
            "replace the folder: move them away or choose another --output."
        )


__all__ = [
    "ENCODING_ERRORS",
    "TOKENIZERS",
    "PreparationSettings",
    "build_parser",
    "check_output_folder",
    "count_sample_bigrams",
    "model_from_graph",
    "prepare",
    "run",
]
