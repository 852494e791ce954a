"""Tokenizers for BriLLM vocabularies, built on the `tokenizers` library.

Every tokenizer here is a plain ``tokenizer.json`` wrapped in `PreTrainedTokenizerFast`, so ``AutoTokenizer``
loads it without custom code. This file imports only tokenizers and transformers (it may be copied as
remote code).
"""

import json
from collections import Counter
from pathlib import Path

from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast

SPECIAL_TOKENS = ("[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]", "<unk>", "<pad>", "<s>", "</s>")
# The text boundary (BOS = EOS, e.g. lm-evaluation-harness's prefix and end-of-text token): an existing special
# token, so the vocabulary and the graph stay as they are. The first present wins; the reference Chinese
# vocabulary has only <unk>. Nothing adds it to encoded text: it is for tools that ask for it.
BOUNDARY_TOKENS = ("[SEP]", "</s>", "<pad>", "[PAD]", "<unk>", "[UNK]")


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
    tokenizer.normalizer = full_width_folding(vocab)
    tokenizer.pre_tokenizer = pre_tokenizers.Split("", behavior="isolated")
    tokenizer.decoder = decoders.Fuse()
    return _wrap(tokenizer, vocab)


def full_width_folding(vocab):
    """Normalizer folding full-width forms (``，（）！：`` ..., U+FF01-FF5E, and the ideographic space) to half width.

    Only characters that ``vocab`` lacks and whose half-width form it holds are folded, so a vocabulary that
    keeps a full-width character keeps it. The released Chinese vocabulary holds half-width punctuation only
    (the reference code crashes on full-width input). Returns `None` when there is nothing to fold.

    Example:

    ```python
    >>> full_width_folding({"<unk>": 0, ",": 1, "!": 2}).normalize_str("好，好！Ａ")
    '好,好!Ａ'
    >>> full_width_folding({"<unk>": 0, "好": 1}) is None
    True

    ```
    """
    pairs = [(chr(code), chr(code - 0xFEE0)) for code in range(0xFF01, 0xFF5F)] + [("\u3000", " ")]
    folds = [normalizers.Replace(wide, narrow) for wide, narrow in pairs if wide not in vocab and narrow in vocab]
    return normalizers.Sequence(folds) if folds else None


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


def save_tokenizer(tokenizer, save_directory, context_length=None):
    """``tokenizer.save_pretrained`` readable by transformers 4.x too: ``tokenizer_class`` "PreTrainedTokenizerFast".

    transformers 5 writes "TokenizersBackend", a name 4.x does not know; 5.x reads "PreTrainedTokenizerFast" back
    as the same class. ``context_length`` (the training sample length) becomes ``model_max_length``, the length
    the tokenizer advertises (see `BriLLMConfig`'s ``context_length``). Returns the saved file names.

    Example:

    ```python
    >>> import json, tempfile
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     _ = save_tokenizer(character_tokenizer({"<unk>": 0, "春": 1}), folder)
    ...     json.loads((Path(folder) / "tokenizer_config.json").read_text())["tokenizer_class"]
    'PreTrainedTokenizerFast'

    ```
    """
    if context_length is not None:
        tokenizer.model_max_length = context_length
    files = tokenizer.save_pretrained(save_directory)
    path = Path(save_directory) / "tokenizer_config.json"
    config = json.loads(path.read_text(encoding="utf-8"))
    if config.get("tokenizer_class") == "TokenizersBackend":
        config["tokenizer_class"] = "PreTrainedTokenizerFast"
        path.write_text(json.dumps(config, indent=2, sort_keys=True, ensure_ascii=False) + "\n", encoding="utf-8")
    return files


def train_character_tokenizer(texts, vocab_size=4000, unk_token="<unk>", pad_token="<pad>"):
    """Character-level tokenizer of the most frequent characters of ``texts`` (an iterable of strings).

    ``vocab_size`` is a cap: ids 0 and 1 are ``unk_token`` and ``pad_token``, then at most ``vocab_size - 2``
    characters by descending count (ties by code point). Rarer characters become ``unk_token``; a corpus with
    fewer distinct characters gets a smaller vocabulary.

    Example:

    ```python
    >>> tok = train_character_tokenizer(["abracadabra\\n"], vocab_size=5)
    >>> tok.convert_ids_to_tokens(list(range(len(tok))))
    ['<unk>', '<pad>', 'a', 'b', 'r']
    >>> tok("cab")["input_ids"]
    [0, 2, 3]

    ```
    """
    if vocab_size < 3:
        raise ValueError(f"vocab_size must be at least 3 (unknown, padding and one character); got {vocab_size}.")
    counts = Counter()
    for text in texts:
        counts.update(text)
    if not counts:
        raise ValueError("cannot train a character tokenizer on empty text.")
    characters = sorted(counts, key=lambda character: (-counts[character], character))[: vocab_size - 2]
    vocab = {unk_token: 0, pad_token: 1}
    vocab.update({character: index for index, character in enumerate(characters, start=2)})
    return character_tokenizer(vocab, unk_token=unk_token)


def train_bpe_tokenizer(texts, vocab_size=4000, unk_token="<unk>", pad_token="<pad>", min_frequency=2):
    """Byte-level BPE (GPT-2 style, no prefix space) with exactly ``vocab_size`` tokens, trained on ``texts``.

    Ids 0 and 1 are ``unk_token`` and ``pad_token`` (byte-level BPE never needs the unknown token, it is kept
    for a uniform layout), then the 256 byte symbols, then the merges. Only pairs seen ``min_frequency`` times
    are merged; raises `ValueError` when the corpus is too small to learn ``vocab_size`` tokens.

    Example:

    ```python
    >>> tok = train_bpe_tokenizer(["the cat sat on the mat\\n"] * 50, vocab_size=262)
    >>> len(tok), tok.decode(tok("the mat")["input_ids"])
    (262, 'the mat')
    >>> train_bpe_tokenizer(["the cat\\n"], vocab_size=4000)
    Traceback (most recent call last):
    ...
    ValueError: the corpus is too small for a BPE vocabulary of 4000 tokens: it yields only 258 (258 = 2 special + 256 bytes at least); lower vocab_size or give more text.

    ```
    """
    minimum = 2 + len(pre_tokenizers.ByteLevel.alphabet())
    if vocab_size < minimum:
        raise ValueError(f"a byte-level BPE vocabulary needs at least {minimum} tokens (2 special + 256 bytes); got {vocab_size}.")
    tokenizer = Tokenizer(models.BPE(unk_token=unk_token))
    tokenizer.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=False)
    tokenizer.decoder = decoders.ByteLevel()
    trainer = trainers.BpeTrainer(
        vocab_size=vocab_size,
        min_frequency=min_frequency,
        special_tokens=[unk_token, pad_token],
        initial_alphabet=pre_tokenizers.ByteLevel.alphabet(),
        show_progress=False,
    )
    tokenizer.train_from_iterator(texts, trainer)
    if tokenizer.get_vocab_size() < vocab_size:
        raise ValueError(
            f"the corpus is too small for a BPE vocabulary of {vocab_size} tokens: it yields only "
            f"{tokenizer.get_vocab_size()} ({minimum} = 2 special + 256 bytes at least); lower vocab_size or give more text."
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
    boundary = next((t for t in BOUNDARY_TOKENS if t in vocab), None)
    specials.update(bos_token=boundary, eos_token=boundary)
    specials = {name: token for name, token in specials.items() if token is not None}
    return PreTrainedTokenizerFast(tokenizer_object=tokenizer, padding_side="left", **specials)


__all__ = [
    "character_tokenizer",
    "full_width_folding",
    "is_character_vocabulary",
    "save_tokenizer",
    "tokenizer_from_json",
    "train_bpe_tokenizer",
    "train_character_tokenizer",
]
