"""Export a BriLLM folder back to the reference BriLLM0.5 layout, so that the reference code can run it.

    python conversion/export_official_checkpoint.py DIR --output model.bin \
        [--vocab vocab.json] [--frequencies word_frequency.json]

(``python -m modeling_brillm.export ...`` is the same command.) ``model.bin`` is a ``torch.save`` of the reference
state dict: ``positions``, ``weights``, ``biases``, ``node_bias``, float32 (a bfloat16 folder is widened exactly).
The reference rebuilds the slot map from a vocabulary and a frequency file, so ``--vocab`` (from the folder's
tokenizer) and ``--frequencies`` (count 1 for every edge that owns a slot, 0 for the others) write those too.
Converting the result again (`modeling_brillm.conversion`) gives back the folder's tensors bit for bit.

The weights are memory-mapped from the safetensors files and streamed to ``model.bin``; outputs are written to
temporary files and renamed at the end, so a failed export leaves no partial file.

Example (a round trip through the reference layout):

```python
>>> import tempfile
>>> from modeling_brillm import BriLLMConfig, BriLLMForCausalLM
>>> from modeling_brillm.conversion import convert
>>> from modeling_brillm.tokenization_brillm import character_tokenizer, save_tokenizer
>>> folder = Path(tempfile.mkdtemp())
>>> model = BriLLMForCausalLM.from_graph(BriLLMConfig(vocab_size=4, hidden_size=2, num_slots=3), [0, 1, 1, 2, 2],
...                                      torch.tensor([2, 0], dtype=torch.int32))
>>> model.save_pretrained(folder / "hf")
>>> _ = save_tokenizer(character_tokenizer({"[PAD]": 0, "[UNK]": 1, "a": 2, "b": 3}, unk_token="[UNK]"), folder / "hf")
>>> state = export(folder / "hf", folder / "model.bin", folder / "vocab.json", folder / "freq.json")
>>> list(state), tuple(state["weights"].shape)
(['positions', 'weights', 'biases', 'node_bias'], (3, 2, 2))
>>> again = convert(folder / "model.bin", folder / "vocab.json", folder / "freq.json", folder / "again")
>>> torch.equal(again.model.weights, model.model.weights), again.get_edge_graph().col_idx.tolist()
(True, [2, 0])

```
"""

import argparse
import json
import os
import tempfile
from pathlib import Path

import torch

from .conversion import REFERENCE_KEYS, ConversionError
from .modeling_brillm import BriLLMForCausalLM
from .output_folders import current_umask


def check_safetensors(path):
    """Raise `ConversionError` naming ``path`` if it is not a complete safetensors file (truncated, corrupted).

    Checks the header and that the tensors it lists exactly fill the file; reads no tensor data.
    """
    path = Path(path)
    size = path.stat().st_size
    with open(path, "rb") as f:
        prefix = f.read(8)
        header_size = int.from_bytes(prefix, "little") if len(prefix) == 8 else None
        if header_size is None or header_size > size - 8:
            raise ConversionError(f"{path}: not a safetensors file or truncated: {size:,} bytes cannot hold its header.")
        try:
            header = json.loads(f.read(header_size))
            end = max((entry["data_offsets"][1] for name, entry in header.items() if name != "__metadata__"), default=0)
        except (ValueError, KeyError, TypeError, IndexError) as error:
            raise ConversionError(f"{path}: corrupted safetensors header ({error}).") from None
    if 8 + header_size + end != size:
        raise ConversionError(
            f"{path}: truncated or corrupted: its header lists {8 + header_size + end:,} bytes of tensors and "
            f"header, the file has {size:,}."
        )


def load_folder(folder):
    """The `BriLLMForCausalLM` of a ``save_pretrained`` folder (weights memory-mapped), checked file by file."""
    folder = Path(folder)
    if not (folder / "config.json").is_file():
        raise ConversionError(f"{folder}: not a checkpoint folder (no config.json).")
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = sorted(set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values()))
    else:
        shards = ["model.safetensors"]
    for shard in shards:
        if not (folder / shard).is_file():
            raise ConversionError(f"{folder / shard}: missing; the folder has no complete set of weights.")
        check_safetensors(folder / shard)
    try:
        return BriLLMForCausalLM.from_pretrained(folder)
    except (ValueError, OSError) as error:
        raise ConversionError(f"{folder}: cannot load it: {error}") from None


def reference_state(model):
    """The reference state dict (its key order) of a BriLLM model: float32 tensors, shared with the model if float32."""
    base = model.base_model
    return {key: getattr(base, key).detach().float() for key in REFERENCE_KEYS}


def vocabulary(folder, vocab_size):
    """``{token: id}`` of the folder's ``tokenizer.json``, ids 0 .. V-1 in order (the reference node order)."""
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        raise ConversionError(f"{folder} has no tokenizer.json, so no vocabulary can be written; omit --vocab.")
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    vocab = dict(tokenizer["model"]["vocab"])
    vocab.update({token["content"]: token["id"] for token in tokenizer.get("added_tokens", [])})
    if sorted(vocab.values()) != list(range(vocab_size)):
        raise ConversionError(f"{path}: its {len(vocab)} token ids are not exactly 0 .. {vocab_size - 1} (the nodes).")
    return dict(sorted(vocab.items(), key=lambda item: item[1]))


def write_frequencies(path, vocab, graph):
    """Write ``{source: {target: count}}`` (owned edges 1 first, shared edges 0), one source row at a time."""
    quoted = [json.dumps(token, ensure_ascii=False) for token in vocab]
    row_ptr, col_idx = graph.row_ptr.tolist(), graph.col_idx.tolist()
    with open(path, "w", encoding="utf-8") as file:
        file.write("{")
        for source in range(len(quoted)):
            owned = col_idx[row_ptr[source] : row_ptr[source + 1]]
            shared = sorted(set(range(len(quoted))) - set(owned))
            row = [f"{quoted[t]}: 1" for t in owned] + [f"{quoted[t]}: 0" for t in shared]
            file.write(f"{', ' if source else ''}{quoted[source]}: {{{', '.join(row)}}}")
        file.write("}")


def write_file_atomically(path, write):
    """``write(temporary_path)`` next to ``path``, then rename it to ``path`` (no partial file on failure)."""
    path = Path(path)
    descriptor, partial = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.partial-")
    os.close(descriptor)
    try:
        write(partial)
        os.chmod(partial, 0o666 & ~current_umask())  # mkstemp makes it private; the result is an ordinary file
        os.replace(partial, path)
    except BaseException:
        Path(partial).unlink(missing_ok=True)
        raise


def export(folder, output, vocab_output=None, frequencies_output=None):
    """Write the reference ``model.bin`` (and optionally its vocabulary and frequency files); returns the state."""
    model = load_folder(folder)
    vocab = vocabulary(folder, model.config.vocab_size) if vocab_output or frequencies_output else None
    state = reference_state(model)
    write_file_atomically(output, lambda path: torch.save(state, path))
    if vocab_output:
        text = json.dumps(vocab, ensure_ascii=False, indent=2)
        write_file_atomically(vocab_output, lambda path: Path(path).write_text(text, encoding="utf-8"))
    if frequencies_output:
        write_file_atomically(frequencies_output, lambda path: write_frequencies(path, vocab, model.get_edge_graph()))
    return state


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("folder", help="a save_pretrained folder (e.g. a converted or trained BriLLM)")
    parser.add_argument("--output", required=True, help="reference checkpoint to write (model.bin)")
    parser.add_argument("--vocab", help="also write the reference vocabulary json {token: id}")
    parser.add_argument("--frequencies", help="also write a word_frequency json that rebuilds the slot map")
    args = parser.parse_args(argv)
    try:
        state = export(args.folder, args.output, args.vocab, args.frequencies)
    except (ValueError, OSError) as error:  # ConversionError, an unreadable or unwritable file
        parser.exit(2, f"error: {error}\n")
    weights = state["weights"]
    print(f"wrote {args.output}: {weights.shape[0]:,} slots, d={weights.shape[-1]}, V={state['node_bias'].shape[0]}")


__all__ = [
    "check_safetensors",
    "export",
    "load_folder",
    "reference_state",
    "vocabulary",
    "write_file_atomically",
    "write_frequencies",
]


if __name__ == "__main__":
    main()
