"""Convert a reference BriLLM0.5 checkpoint (``model_en.bin`` / ``model_zh.bin``) to a Hugging Face folder.

    python conversion/convert_official_checkpoint.py --checkpoint model.bin --vocab vocab.json \
        --frequencies word_frequency.json --output DIR [--dtype float32|bfloat16] [--tokenizer-json bpe.json] \
        [--max-shard-size 2GB] [--language en] [--license unknown]

(``python -m modeling_brillm.conversion ...`` is the same command.) The reference keeps the slot map outside the
checkpoint: an edge whose count in ``word_frequency.json`` is 0 uses the shared slot 0, every other edge owns the
next slot, row-major in node-id order. This module rebuilds that map as CSR buffers (streaming over the frequency
file: no V x V dictionary is kept), checks it against the checkpoint, and writes safetensors, config, remote code,
a model card and, when it can, a tokenizer.

The checkpoint is memory-mapped, never copied: converting the released English model (3.8 GB) peaks at 1.3x its
size, 1.6x to bfloat16 (``benchmarks/bench_checkpoint_size.py``). Everything is written to a temporary folder next to
``--output`` and renamed at the end, so a failed conversion leaves ``--output`` as it was.

Only this module and its inverse `modeling_brillm.export` know the reference layout; everything else uses the
Hugging Face one. Not part of the remote code: a converted folder loads without the package.
"""

import argparse
import fnmatch
import json
import sys
import zipfile
from pathlib import Path

import numpy as np
import torch

from . import __version__
from .configuration_brillm import BriLLMConfig
from .graph_brillm import BriLLMEdgeGraph
from .hub_brillm import write_model_card
from .modeling_brillm import BriLLMForCausalLM, count_non_finite
from .output_folders import holds_anything, staged_folder
from .tokenization_brillm import character_tokenizer, is_character_vocabulary, save_tokenizer, tokenizer_from_json

REFERENCE_KEYS = ("positions", "weights", "biases", "node_bias")
REFERENCE_CONTEXT_LENGTH = 32  # the reference models were trained on 32-token samples
# What a conversion writes (save_pretrained, tokenizer, card): a folder holding anything else is never replaced.
CONVERSION_FILES = (
    "config.json", "generation_config.json", "model.safetensors", "model-*-of-*.safetensors",
    "model.safetensors.index.json", "tokenizer.json", "tokenizer_config.json", "special_tokens_map.json",
    "README.md", "*.py",
)  # fmt: skip


class ConversionError(ValueError):
    """The reference files are inconsistent; the message says which and how.

    Example:

    ```python
    >>> import tempfile
    >>> vocab = Path(tempfile.mkdtemp()) / "vocab.json"
    >>> _ = vocab.write_text('{"a": 0, "b": 2}')
    >>> try:
    ...     read_vocabulary(vocab)
    ... except ConversionError as error:
    ...     print(str(error).replace(str(vocab), "vocab.json"))
    vocab.json: token ids must be 0 .. 1 in file order (the reference numbers nodes by position); entry 1 has id 2.

    ```
    """


def read_json(path, **kwargs):
    """``json.load`` of a file; an unreadable file raises `ConversionError` naming it."""
    try:
        with open(path, encoding="utf-8") as f:
            return json.load(f, **kwargs)
    except (json.JSONDecodeError, UnicodeDecodeError) as error:
        raise ConversionError(f"{path}: not valid UTF-8 JSON ({error}); is the file truncated?") from None


def read_vocabulary(path):
    """``{token: id}`` with ids exactly 0 .. V-1 in file order (the reference numbers nodes by that order)."""
    vocab = read_json(path)
    if not isinstance(vocab, dict) or not vocab:
        raise ConversionError(f"{path}: expected a non-empty JSON object {{token: id}}.")
    ids = list(vocab.values())
    if ids != list(range(len(ids))):
        first = next(i for i, index in enumerate(ids) if index != i)
        raise ConversionError(
            f"{path}: token ids must be 0 .. {len(ids) - 1} in file order (the reference numbers nodes by "
            f"position); entry {first} has id {ids[first]!r}."
        )
    return vocab


def read_slot_map(path, vocab, vocab_name="given"):
    """CSR ``(row_ptr (V+1,) int64, col_idx (own,) int32)`` of the edges that own a slot.

    As in the reference, an edge owns a slot unless ``word_frequency.json`` lists it with count 0.
    ``vocab_name`` (the vocabulary's file) only serves error messages.
    """
    V = len(vocab)
    shared_targets = {}

    def on_object(pairs):
        if pairs and isinstance(pairs[0][1], np.ndarray):
            return dict(pairs)  # the outer object: {source: target ids with count 0}
        unknown = next((target for target, _ in pairs if target not in vocab), None)
        if unknown is not None:
            raise ConversionError(
                f"{path}: target token {unknown!r} is not in the vocabulary {vocab_name}; the frequency file "
                "belongs to another vocabulary."
            )
        return np.fromiter((vocab[t] for t, count in pairs if count == 0), dtype=np.int64)

    frequencies = read_json(path, object_pairs_hook=on_object)
    if not isinstance(frequencies, dict):
        raise ConversionError(f"{path}: expected a JSON object {{source: {{target: count}}}} with one entry per token.")
    for source, zero_targets in frequencies.items():
        if source not in vocab:
            raise ConversionError(
                f"{path}: source token {source!r} is not in the vocabulary {vocab_name}; the frequency file "
                "belongs to another vocabulary."
            )
        shared_targets[vocab[source]] = zero_targets
    missing = [token for token in vocab if vocab[token] not in shared_targets]
    if missing:
        raise ConversionError(
            f"{path}: {len(missing)} tokens of the vocabulary {vocab_name} have no entry (e.g. {missing[:3]}); the "
            "reference needs one per source node."
        )
    keys = []  # source * V + target of every owned edge, in slot order
    owned = np.ones(V, dtype=bool)
    for source in range(V):
        owned[:] = True
        zero = shared_targets[source]
        if zero.size:
            owned[zero] = False
        keys.append(source * V + np.flatnonzero(owned))
    graph = BriLLMEdgeGraph.from_edge_keys(np.concatenate(keys) if keys else np.zeros(0, dtype=np.int64), V)
    return graph.row_ptr, graph.col_idx


def read_checkpoint(path):
    """The four reference tensors of ``model.bin``, memory-mapped (nothing is copied); checks keys, dtypes, values."""
    path = Path(path)
    if not path.is_file():
        raise ConversionError(f"{path}: no such file.")
    try:  # torch.save's zip format maps without copying; the legacy format must be read into memory
        state = torch.load(path, map_location="cpu", weights_only=True, mmap=zipfile.is_zipfile(path))
    except Exception as error:  # torch raises RuntimeError, EOFError, UnpicklingError, ... on a damaged file
        first_sentence = (str(error).strip().splitlines() or [""])[0].split(". ")[0].rstrip(".")
        reason = f"{type(error).__name__}: {first_sentence}" if first_sentence else type(error).__name__
        raise ConversionError(
            f"{path}: cannot read this checkpoint ({reason}); the file is truncated or corrupted, or not a "
            "torch.save of the reference state dict."
        ) from None
    if not isinstance(state, dict) or not all(isinstance(value, torch.Tensor) for value in state.values()):
        raise ConversionError(f"{path}: expected a state dict {{name: tensor}}; got {type(state).__name__}.")
    missing = [key for key in REFERENCE_KEYS if key not in state]
    if missing:
        raise ConversionError(f"{path}: missing tensors {missing}; a reference checkpoint holds {list(REFERENCE_KEYS)}.")
    extra = sorted(set(state) - set(REFERENCE_KEYS))
    if extra:
        raise ConversionError(f"{path}: unexpected tensors {extra}; is this a reference BriLLM0.5 checkpoint?")
    for key in REFERENCE_KEYS:
        if not state[key].is_floating_point():
            raise ConversionError(f"{path}: {key} has dtype {state[key].dtype}; the reference stores float tensors.")
        bad = count_non_finite(state[key])
        if bad:
            raise ConversionError(f"{path}: {key} holds {bad:,} NaN or infinite values; the file is corrupted.")
    return state


def convert(
    checkpoint,
    vocab_path,
    frequencies,
    output,
    dtype="float32",
    tokenizer_json=None,
    position_shift=1,
    max_shard_size="2GB",
    language=None,
    license="unknown",
):
    """Write a ``from_pretrained`` folder with tokenizer and model card; returns the model (float32 or ``dtype``).

    Everything is checked before anything is written; the folder is assembled next to ``output`` and renamed
    into place at the end (replacing an earlier conversion there).
    """
    output = Path(output)
    check_output_folder(output)
    vocab = read_vocabulary(vocab_path)
    state = read_checkpoint(checkpoint)
    _check_shapes(state, len(vocab), checkpoint, vocab_path)
    row_ptr, col_idx = read_slot_map(frequencies, vocab, vocab_path)
    if state["weights"].shape[0] != 1 + col_idx.numel():
        raise ConversionError(
            f"{checkpoint} has {state['weights'].shape[0]} slots but {frequencies} gives {col_idx.numel()} non-zero "
            f"pairs, which need 1 + {col_idx.numel()} = {1 + col_idx.numel()} slots (the shared slot 0 and one per "
            "pair). The checkpoint and the frequency file do not belong together."
        )
    tokenizer = _reference_tokenizer(vocab, tokenizer_json)
    model = _reference_model(state, vocab, row_ptr, col_idx, position_shift)
    if dtype != "float32":
        model.to(getattr(torch, dtype))
    files = [f"checkpoint `{Path(checkpoint).name}`", f"vocabulary `{Path(vocab_path).name}`"]
    files += [f"edge frequencies `{Path(frequencies).name}`"]
    files += [f"tokenizer `{Path(tokenizer_json).name}`"] if tokenizer_json else []
    made_from = (
        f"Converted from the reference BriLLM0.5 files ({', '.join(files)}) by "
        f"`modeling_brillm.conversion` (brillm {__version__}), stored as {dtype}. Reference code: "
        "https://github.com/brillm05/BriLLM0.5; released weights: https://huggingface.co/BriLLM/BriLLM0.5. "
        f"`position_shift={position_shift}` follows the reference "
        f"{'forward (training)' if position_shift == 1 else 'decoder'}; `suppress_self_loop=True`: like the "
        "reference decoder, generation never proposes the current token again."
    )
    with staged_folder(output) as staging:
        model.save_pretrained(staging, max_shard_size=max_shard_size)
        if tokenizer is not None:
            save_tokenizer(tokenizer, staging, context_length=REFERENCE_CONTEXT_LENGTH)
        write_model_card(staging, model.config, made_from=made_from, language=language, license=license)
    return model


def _check_shapes(state, vocab_size, checkpoint, vocab_path):
    """Raise `ConversionError` unless the four tensors have the reference shapes of one model of ``vocab_size``
    nodes (the file names only serve the messages)."""
    weights, node_bias, positions = state["weights"], state["node_bias"], state["positions"]
    P, d, V = weights.shape[0], weights.shape[-1], vocab_size
    if node_bias.shape[0] != V:
        raise ConversionError(
            f"{checkpoint}: node_bias has {node_bias.shape[0]} rows (one per node) but the vocabulary {vocab_path} "
            f"has {V} tokens. The checkpoint and the vocabulary do not belong together."
        )
    expected = {"weights": (P, d, d), "biases": (P, 1, d), "node_bias": (V, 1, d), "positions": (1, positions.shape[1], 1)}
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise ConversionError(f"{checkpoint}: {key} has shape {tuple(state[key].shape)}, expected {shape}.")


def _reference_tokenizer(vocab, tokenizer_json=None):
    """The tokenizer of the vocabulary: the given tokenizers JSON, one token per character for a character
    vocabulary, else `None` (with a note on stderr)."""
    if tokenizer_json is not None:
        return tokenizer_from_json(tokenizer_json, vocab)
    if is_character_vocabulary(vocab):
        return character_tokenizer(vocab, unk_token="<unk>" if "<unk>" in vocab else "[UNK]")
    print(
        "note: the vocabulary has multi-character tokens and no --tokenizer-json was given, so no tokenizer was "
        "written; pass the released BPE file (e.g. wiki_bpe_tokenizer_4000_bytelevel.json) to add one.",
        file=sys.stderr,
    )
    return None


def _reference_model(state, vocab, row_ptr, col_idx, position_shift):
    """The float32 `BriLLMForCausalLM` holding the reference tensors ``state`` (memory-mapped, not copied) on the
    slot map ``row_ptr``, ``col_idx``."""
    weights, positions = state["weights"], state["positions"]
    config = BriLLMConfig(
        vocab_size=len(vocab),
        hidden_size=weights.shape[-1],
        max_position_embeddings=positions.shape[1],
        num_slots=weights.shape[0],
        position_shift=position_shift,
        suppress_self_loop=True,
        pad_token_id=next((vocab[t] for t in ("[PAD]", "<pad>") if t in vocab), None),
        unk_token_id=next((vocab[t] for t in ("[UNK]", "<unk>") if t in vocab), None),
        context_length=REFERENCE_CONTEXT_LENGTH,
    )
    with torch.device("meta"):
        model = BriLLMForCausalLM(config)
    # assign=True keeps the memory-mapped tensors themselves as parameters: no copy of the weights.
    model.model.load_state_dict(
        {**{k: state[k].float() for k in REFERENCE_KEYS}, "graph.row_ptr": row_ptr, "graph.col_idx": col_idx},
        assign=True,
    )
    model.get_edge_graph().check()
    return model


def check_output_folder(output):
    """Refuse an ``output`` that is a file, or a non-empty folder that holds anything but an earlier conversion: a
    BriLLM ``config.json`` and only the files of `CONVERSION_FILES` (a training output, with its checkpoints, is
    never replaced)."""
    output = Path(output)
    if not holds_anything(output):
        return
    config = output / "config.json"
    if not config.is_file() or read_json(config).get("model_type") != "brillm":
        raise ConversionError(
            f"{output} is a non-empty folder without a BriLLM checkpoint; refusing to replace it (choose a new --output)."
        )
    foreign = sorted(
        path.name
        for path in output.iterdir()
        if path.is_dir() or not any(fnmatch.fnmatch(path.name, pattern) for pattern in CONVERSION_FILES)
    )
    if foreign:
        raise ConversionError(
            f"{output} holds {output / foreign[0]}, which a conversion does not write ({len(foreign)} such entries, "
            "e.g. training checkpoints); refusing to replace it (choose a new --output)."
        )


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--checkpoint", required=True, help="reference model.bin (torch.save of the state dict)")
    parser.add_argument("--vocab", required=True, help="vocabulary json {token: id}")
    parser.add_argument("--frequencies", required=True, help="word_frequency json {source: {target: count}}")
    parser.add_argument("--output", required=True, help="folder to write")
    parser.add_argument("--dtype", choices=("float32", "bfloat16"), default="float32", help="storage dtype")
    parser.add_argument("--tokenizer-json", help="tokenizers JSON matching the vocabulary (the released English BPE)")
    parser.add_argument(
        "--position-shift",
        type=int,
        choices=(0, 1),
        default=1,
        help="1: the reference training convention (its forward); 0: reproduce the reference decoder",
    )
    parser.add_argument("--max-shard-size", default="2GB", help="largest safetensors file (a bigger tensor gets its own)")
    parser.add_argument("--language", help="language code for the model card (default: guessed from the tokenizer)")
    parser.add_argument("--license", default="unknown", help="licence for the model card metadata")
    args = parser.parse_args(argv)
    try:
        model = convert(
            args.checkpoint,
            args.vocab,
            args.frequencies,
            args.output,
            args.dtype,
            args.tokenizer_json,
            args.position_shift,
            max_shard_size=args.max_shard_size,
            language=args.language,
            license=args.license,
        )
    except (ValueError, OSError) as error:  # ConversionError, a tokenizer that does not fit, an unreadable file
        parser.exit(2, f"error: {error}\n")
    config = model.config
    print(
        f"wrote {args.output}: V={config.vocab_size} d={config.hidden_size} slots={config.num_slots} "
        f"({model.num_parameters():,} parameters, {args.dtype})"
    )


__all__ = [
    "CONVERSION_FILES",
    "REFERENCE_KEYS",
    "ConversionError",
    "check_output_folder",
    "convert",
    "read_checkpoint",
    "read_json",
    "read_slot_map",
    "read_vocabulary",
]


if __name__ == "__main__":
    main()
