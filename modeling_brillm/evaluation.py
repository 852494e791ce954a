"""Held-out quality of a BriLLM model: full-vocabulary perplexity per token and bits per character.

    brillm eval MODEL_DIR --data valid.txt [--seq-len 32]

prints one JSON line ``{"tokens", "characters", "nll_per_token", "perplexity", "bits_per_char", ...}``.
The text is cut into consecutive windows of ``seq_len`` tokens; within a window every token after the first is
predicted from the ones before it (the first has no context and is not scored). Bits per character divide the
total negative log-likelihood (in bits) by the characters of the scored tokens.
"""

import json
import math
from pathlib import Path

import torch
import torch.nn.functional as F

TOKENIZER_FILES = ("tokenizer.json", "tokenizer_config.json")


def character_lengths(tokenizer, vocab_size):
    """Characters of text each token id stands for (0 for special tokens): (V,) float64, for bits/char."""
    lengths = torch.zeros(vocab_size, dtype=torch.float64)
    special = set(tokenizer.all_special_ids)
    for token, index in tokenizer.get_vocab().items():
        if index < vocab_size and index not in special:
            lengths[index] = len(tokenizer.convert_tokens_to_string([token]))
    return lengths


@torch.no_grad()
def evaluate_nll(model, batches, char_lengths=None):
    """Sum of full-vocabulary negative log-likelihoods (nats) over every predicted token, and counts.

    ``batches`` yields ``input_ids`` (B, L) (and optionally ``attention_mask``, and ``num_chars`` (B,): the
    characters of each sample's scored tokens, as `brillm prepare`'s samples record them); token ``t+1`` is
    predicted from the text up to ``t``. The characters are the batches' ``num_chars`` where they have them, else
    the ``char_lengths`` (`character_lengths`) of the scored tokens. Returns ``{"nll": ..., "tokens": ...,
    "characters": ...}`` (plain floats).
    """
    was_training = model.training
    model.eval()
    total = torch.zeros(3, dtype=torch.float64)
    for batch in batches:
        input_ids = batch["input_ids"]
        mask = batch.get("attention_mask")
        logits = model(input_ids, attention_mask=mask, use_cache=False).logits[:, :-1].float()
        targets = input_ids[:, 1:]
        nll = F.cross_entropy(logits.reshape(-1, logits.shape[-1]), targets.reshape(-1), reduction="none").view_as(targets)
        valid = torch.ones_like(targets, dtype=torch.bool) if mask is None else mask[:, 1:].bool() & mask[:, :-1].bool()
        total[0] += nll[valid].double().sum().cpu()
        total[1] += valid.sum().cpu()
        if "num_chars" in batch:
            total[2] += batch["num_chars"].double().sum().cpu()
        elif char_lengths is not None:
            total[2] += char_lengths.to(targets.device)[targets][valid].sum().cpu()
    model.train(was_training)
    return {"nll": total[0].item(), "tokens": total[1].item(), "characters": total[2].item()}


def summarize_nll(sums):
    """Perplexity per token and bits per character from `evaluate_nll` sums.

    Example:

    ```python
    >>> summarize_nll({"nll": 2.0 * math.log(2), "tokens": 2.0, "characters": 4.0})
    {'tokens': 2, 'characters': 4, 'nll_per_token': 0.693147, 'perplexity': 2.0, 'bits_per_char': 0.5}

    ```
    """
    tokens, characters = sums["tokens"], sums["characters"]
    per_token = sums["nll"] / max(tokens, 1)
    return {
        "tokens": int(tokens),
        "characters": int(characters),
        "nll_per_token": round(per_token, 6),
        "perplexity": round(math.exp(per_token), 4),
        "bits_per_char": round(sums["nll"] / math.log(2) / characters, 4) if characters else None,
    }


def evaluate_text(model, tokenizer, text, seq_len=32, batch_size=64):
    """`summarize_nll` of ``text`` cut into windows of ``seq_len`` tokens (the last partial window is kept)."""
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (one context token and one predicted token); got {seq_len}.")
    ids = tokenizer(text, add_special_tokens=False, return_attention_mask=False)["input_ids"]
    if len(ids) < 2:
        raise ValueError("the evaluation text holds fewer than 2 tokens: nothing to predict.")
    windows = [ids[i : i + seq_len] for i in range(0, len(ids), seq_len)]
    windows = [w for w in windows if len(w) >= 2]

    def batches():
        for start in range(0, len(windows), batch_size):
            chunk = windows[start : start + batch_size]
            width = max(map(len, chunk))
            input_ids = torch.zeros(len(chunk), width, dtype=torch.long)
            mask = torch.zeros(len(chunk), width, dtype=torch.long)
            for row, window in enumerate(chunk):  # right padding: masked positions are neither read nor scored
                input_ids[row, : len(window)] = torch.tensor(window)
                mask[row, : len(window)] = 1
            yield {"input_ids": input_ids, "attention_mask": mask}

    result = summarize_nll(evaluate_nll(model, batches(), character_lengths(tokenizer, model.config.vocab_size)))
    return {**result, "seq_len": seq_len}


def load_model_folder(model_dir, tokenizer_needed="this command reads text", allow_non_finite_weights=False):
    """``(model, tokenizer)`` of a ``save_pretrained`` folder for the commands, with one clear `ValueError` for a
    missing folder, a folder without a model, a corrupt tokenizer file and a missing tokenizer (the error ends with
    ``tokenizer_needed``, the reason it is needed; with `None` the tokenizer is `None` then). Everything but the
    weights is checked before they are read."""
    from transformers import AutoModelForCausalLM

    folder = Path(model_dir)
    if not folder.is_dir():
        raise ValueError(f"{folder}: no such model folder.")
    if not (folder / "config.json").is_file():
        raise ValueError(f"{folder} is not a model folder (no config.json); give a save_pretrained folder.")
    tokenizer = _load_tokenizer(folder, tokenizer_needed)
    model = AutoModelForCausalLM.from_pretrained(folder, allow_non_finite_weights=allow_non_finite_weights).eval()
    return model, tokenizer


def _load_tokenizer(folder, tokenizer_needed):
    from transformers import AutoTokenizer

    if not any((folder / name).is_file() for name in TOKENIZER_FILES):
        if tokenizer_needed:
            raise ValueError(f"{folder} has no tokenizer (no {' or '.join(TOKENIZER_FILES)}): {tokenizer_needed}.")
        return None
    for name in TOKENIZER_FILES:
        try:
            if (folder / name).is_file():
                json.loads((folder / name).read_text(encoding="utf-8"))
        except (ValueError, UnicodeDecodeError) as error:
            message = f"{folder / name} is corrupt (not valid UTF-8 JSON: {error}); save the tokenizer again."
            raise ValueError(message) from None
    try:
        tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=False)
    except Exception as error:  # transformers raises OSError, ValueError, KeyError, ... for a tokenizer it cannot read
        reason = " ".join(str(error).split())[:300]
        raise ValueError(f"cannot load the tokenizer of {folder} ({type(error).__name__}: {reason}).") from None
    return tokenizer


def run(args):
    from .data import read_text

    if args.seq_len < 2:
        raise ValueError(f"--seq-len must be at least 2 (one context token, one predicted); got {args.seq_len}.")
    text = "".join(read_text(args.data))  # invalid UTF-8: `CorpusError` with the file and byte offset
    model, tokenizer = load_model_folder(args.model_dir, allow_non_finite_weights=args.allow_non_finite_weights)
    print(json.dumps({"model": str(args.model_dir), "data": str(args.data), **evaluate_text(model, tokenizer, text, args.seq_len)}))


def build_parser(parser):
    parser.add_argument("model_dir", help="a save_pretrained folder with a tokenizer")
    parser.add_argument("--data", required=True, help="a UTF-8 text file")
    parser.add_argument("--seq-len", type=int, default=32, help="tokens per evaluation window (reference samples: 32)")
    parser.add_argument(
        "--allow-non-finite-weights", action="store_true", help="load a checkpoint holding NaN or infinite weights"
    )
    return parser
