"""Tokenizers for BriLLM vocabularies, built on the `tokenizers` library.

Every tokenizer here is a plain ``tokenizer.json`` wrapped in `PreTrainedTokenizerFast`, so ``AutoTokenizer``
loads it without custom code. This file imports only tokenizers and transformers (it may be copied as
remote code).
"""

from tokenizers import Tokenizer, decoders, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<unk>", "<pad>", "<s>", "</s>")


def is_character_vocabulary(vocab):
    """Whether every non-special token of ``{token: id}`` is a single character."""
    return all(len(token) == 1 for token in vocab if token not in SPECIAL_TOKENS)


def character_tokenizer(vocab, unk_token="<unk>"):
    """One token per character; characters outside ``vocab`` become ``unk_token``; decoding joins characters.

    Example:

    ```python
    >>> tok = character_tokenizer({"<unk>": 0, "春": 1, "眠": 2})
    >>> tok("春眠不")["input_ids"], tok.decode([1, 2])
    ([1, 2, 0], '春眠')

    ```
    """
    if unk_token not in vocab:
        raise ValueError(f"a character vocabulary needs its unknown token {unk_token!r}; it is not in the vocabulary.")
    tokenizer = Tokenizer(models.WordLevel(vocab=dict(vocab), unk_token=unk_token))
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return _wrap(tokenizer, vocab)


def tokenizer_from_json(path, vocab=None):
    """Load a ``tokenizers`` JSON file (e.g. the released byte-level BPE); check it agrees with ``vocab``."""
    tokenizer = Tokenizer.from_file(str(path))
    if vocab is not None:
        own = tokenizer.get_vocab()
        mismatched = [token for token, index in vocab.items() if own.get(token) != index]
        if mismatched or len(own) != len(vocab):
            raise ValueError(
                f"tokenizer {path} does not match the vocabulary: {len(own)} vs {len(vocab)} tokens, "
                f"{len(mismatched)} tokens with other ids (e.g. {mismatched[:3]})."
            )
    return _wrap(tokenizer, tokenizer.get_vocab())


def _wrap(tokenizer, vocab):
    specials = {
        "unk_token": next((t for t in ("[UNK]", "<unk>") if t in vocab), None),
        "pad_token": next((t for t in ("[PAD]", "<pad>") if t in vocab), None),
        "cls_token": "[CLS]" if "[CLS]" in vocab else None,
        "sep_token": "[SEP]" if "[SEP]" in vocab else None,
        "mask_token": "[MASK]" if "[MASK]" in vocab else None,
    }
    specials = {name: token for name, token in specials.items() if token is not None}
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, padding_side="left", **specials)


__all__ = ["character_tokenizer", "is_character_vocabulary", "tokenizer_from_json"]
