#!/usr/bin/env python
"""Convert a reference BriLLM0.5 checkpoint (``model_en.bin`` / ``model_zh.bin``) to a Hugging Face folder.

    python conversion/convert_official_checkpoint.py --checkpoint model.bin --vocab vocab.json \
        --frequencies word_frequency.json --output DIR [--dtype float32|bfloat16] [--tokenizer-json bpe.json]

The reference keeps the slot map outside the checkpoint: an edge whose count in ``word_frequency.json`` is 0
uses the shared slot 0, every other edge owns the next slot, row-major in node-id order. This script rebuilds
that map as CSR buffers (streaming over the frequency file: no V x V dictionary is kept), checks it against the
checkpoint, and writes safetensors, config, remote code and, when it can, a tokenizer.

Only this folder knows the reference layout; everything else uses the Hugging Face one.
"""

import argparse
import json
import sys
from pathlib import Path

import numpy as np
import torch

REFERENCE_KEYS = ("positions", "weights", "biases", "node_bias")


class ConversionError(ValueError):
    """The reference files are inconsistent; the message says which and how."""


def read_vocabulary(path):
    """``{token: id}`` with ids exactly 0 .. V-1 in file order (the reference numbers nodes by that order)."""
    with open(path, encoding="utf-8") as f:
        vocab = json.load(f)
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


def read_slot_map(path, vocab):
    """CSR ``(row_ptr (V+1,) int64, col_idx (own,) int32)`` of the edges that own a slot.

    As in the reference, an edge owns a slot unless ``word_frequency.json`` lists it with count 0.
    """
    V = len(vocab)
    shared_targets = {}

    def on_object(pairs):
        if pairs and isinstance(pairs[0][1], np.ndarray):
            return dict(pairs)  # the outer object: {source: target ids with count 0}
        try:
            return np.fromiter((vocab[t] for t, count in pairs if count == 0), dtype=np.int64)
        except KeyError as error:
            raise ConversionError(f"{path}: target token {error.args[0]!r} is not in the vocabulary.") from None

    with open(path, encoding="utf-8") as f:
        frequencies = json.load(f, object_pairs_hook=on_object)
    if not isinstance(frequencies, dict):
        raise ConversionError(f"{path}: expected a JSON object {{source: {{target: count}}}} with one entry per token.")
    for source, zero_targets in frequencies.items():
        if source not in vocab:
            raise ConversionError(f"{path}: source token {source!r} is not in the vocabulary.")
        shared_targets[vocab[source]] = zero_targets
    missing = [token for token in vocab if vocab[token] not in shared_targets]
    if missing:
        raise ConversionError(
            f"{path}: {len(missing)} vocabulary tokens have no entry (e.g. {missing[:3]}); the reference "
            "needs one per source node."
        )
    row_ptr = np.zeros(V + 1, dtype=np.int64)
    rows = []
    owned = np.ones(V, dtype=bool)
    for source in range(V):
        owned[:] = True
        zero = shared_targets[source]
        if zero.size:
            owned[zero] = False
        targets = np.flatnonzero(owned).astype(np.int32)
        rows.append(targets)
        row_ptr[source + 1] = row_ptr[source] + targets.size
    col_idx = np.concatenate(rows) if rows else np.zeros(0, dtype=np.int32)
    return torch.from_numpy(row_ptr), torch.from_numpy(col_idx)


def read_checkpoint(path):
    state = torch.load(path, map_location="cpu", weights_only=True)
    missing = [key for key in REFERENCE_KEYS if key not in state]
    if missing:
        raise ConversionError(f"{path}: missing tensors {missing}; a reference checkpoint holds {list(REFERENCE_KEYS)}.")
    extra = sorted(set(state) - set(REFERENCE_KEYS))
    if extra:
        raise ConversionError(f"{path}: unexpected tensors {extra}; is this a reference BriLLM0.5 checkpoint?")
    return state


def convert(checkpoint, vocab_path, frequencies, output, dtype="float32", tokenizer_json=None, position_shift=1):
    """Write a ``from_pretrained`` folder; returns the model (float32 or ``dtype``)."""
    sys.path.insert(0, str(Path(__file__).resolve().parent.parent))
    from modeling_brillm import BriLLMConfig, BriLLMForCausalLM
    from modeling_brillm.tokenization_brillm import character_tokenizer, is_character_vocabulary, tokenizer_from_json

    vocab = read_vocabulary(vocab_path)
    state = read_checkpoint(checkpoint)
    row_ptr, col_idx = read_slot_map(frequencies, vocab)
    V = len(vocab)
    weights, biases, node_bias, positions = (state[k] for k in ("weights", "biases", "node_bias", "positions"))
    P, d = weights.shape[0], weights.shape[-1]
    if weights.shape[0] != 1 + col_idx.numel():
        raise ConversionError(
            f"{checkpoint} has {weights.shape[0]} slots but {frequencies} gives {col_idx.numel()} non-zero pairs: "
            f"expected weights.shape[0] == 1 + {col_idx.numel()}. The checkpoint and the frequency file do not "
            "belong together."
        )
    expected = {"weights": (P, d, d), "biases": (P, 1, d), "node_bias": (V, 1, d), "positions": (1, positions.shape[1], 1)}
    for key, shape in expected.items():
        if tuple(state[key].shape) != shape:
            raise ConversionError(f"{checkpoint}: {key} has shape {tuple(state[key].shape)}, expected {shape}.")

    config = BriLLMConfig(
        vocab_size=V,
        hidden_size=d,
        max_position_embeddings=positions.shape[1],
        num_slots=P,
        position_shift=position_shift,
        suppress_self_loop=True,
        pad_token_id=next((vocab[t] for t in ("[PAD]", "<pad>") if t in vocab), None),
        unk_token_id=next((vocab[t] for t in ("[UNK]", "<unk>") if t in vocab), None),
    )
    with torch.device("meta"):
        model = BriLLMForCausalLM(config)
    model.model.load_state_dict(
        {**{k: state[k].float() for k in REFERENCE_KEYS}, "graph.row_ptr": row_ptr, "graph.col_idx": col_idx},
        assign=True,
    )
    model.get_edge_graph().check()
    if dtype != "float32":
        model.to(getattr(torch, dtype))
    model.save_pretrained(output)

    if tokenizer_json is not None:
        tokenizer = tokenizer_from_json(tokenizer_json, vocab)
    elif is_character_vocabulary(vocab):
        tokenizer = character_tokenizer(vocab, unk_token="<unk>" if "<unk>" in vocab else "[UNK]")
    else:
        tokenizer = None
        print(
            "note: the vocabulary has multi-character tokens and no --tokenizer-json was given, so no tokenizer was "
            "written; pass the released BPE file (e.g. wiki_bpe_tokenizer_4000_bytelevel.json) to add one.",
            file=sys.stderr,
        )
    if tokenizer is not None:
        tokenizer.save_pretrained(output)
    return model


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
    args = parser.parse_args(argv)
    try:
        model = convert(
            args.checkpoint, args.vocab, args.frequencies, args.output, args.dtype, args.tokenizer_json, args.position_shift
        )
    except (ConversionError, FileNotFoundError, json.JSONDecodeError) as error:
        parser.exit(2, f"error: {error}\n")
    config = model.config
    print(
        f"wrote {args.output}: V={config.vocab_size} d={config.hidden_size} slots={config.num_slots} "
        f"({model.num_parameters():,} parameters, {args.dtype})"
    )


if __name__ == "__main__":
    main()
