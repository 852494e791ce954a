"""Tokenizers for BriLLM vocabularies, built on the `tokenizers` library.

Every tokenizer here is a plain ``tokenizer.json`` wrapped in `PreTrainedTokenizerFast`, so ``AutoTokenizer``
loads it without custom code. This file imports only tokenizers and transformers (it may be copied as
remote code).
"""

import json
from collections import Counter
from pathlib import Path

import torch
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import PreTrainedTokenizerFast
from transformers.generation.logits_process import LogitsProcessor

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


def byte_level_symbols():
    """``{symbol: byte}`` of byte-level BPE (GPT-2's table, as `tokenizers`' ``ByteLevel`` uses it): printable
    bytes stand for themselves, the other 68 for the characters from U+0100 on, in byte order."""
    printable = [*range(ord("!"), ord("~") + 1), *range(ord("¡"), ord("¬") + 1), *range(ord("®"), ord("ÿ") + 1)]
    others = [byte for byte in range(256) if byte not in printable]
    return {**{chr(b): b for b in printable}, **{chr(256 + i): b for i, b in enumerate(others)}}


_LEADS = {**{b: 1 for b in range(0xC2, 0xE0)}, **{b: 2 for b in range(0xE0, 0xF0)}, **{b: 3 for b in range(0xF0, 0xF5)}}
_ANY = (0x80, 0xBF)  # the continuation bytes
_SECOND = {0xE0: (0xA0, 0xBF), 0xED: (0x80, 0x9F), 0xF0: (0x90, 0xBF), 0xF4: (0x80, 0x8F)}  # no overlong, surrogate, > U+10FFFF
# Where a byte stream can stand: between characters, or inside one, needing n more bytes the next of which lies in
# a range (narrower right after the leads of `_SECOND`).
STATES = ((0, _ANY), (1, _ANY), (2, _ANY), (3, _ANY), *((_LEADS[lead], span) for lead, span in _SECOND.items()))


def utf8_shape(data, state=STATES[0]):
    """How the bytes ``data`` continue a UTF-8 stream standing at ``state`` (see `STATES`): the state after
    them, or `None` when they break a character.

    Example:

    ```python
    >>> utf8_shape("é".encode()), utf8_shape("é".encode()[:1]), utf8_shape(b"\\xa9 a", (1, (0x80, 0xBF)))
    ((0, (128, 191)), (1, (128, 191)), (0, (128, 191)))
    >>> utf8_shape(b"\\xa9"), utf8_shape(b"\\xf4\\x90\\x80\\x80")  # a stray continuation byte; above U+10FFFF
    (None, None)

    ```
    """
    need, (low, high) = state
    for byte in data:
        if need:
            if not low <= byte <= high:
                return None
            need, (low, high) = need - 1, _ANY
        elif byte >= 0x80:
            if byte not in _LEADS:  # a continuation byte without a lead, or a byte UTF-8 never uses
                return None
            need, (low, high) = _LEADS[byte], _SECOND.get(byte, _ANY)
    return need, (low, high)


class WholeCharacters(LogitsProcessor):
    """Keeps what a byte-level BPE model generates valid UTF-8: no token that would break a character, and (with
    ``max_length``) no character left unfinished at the end, so the decoded text never shows U+FFFD.

    A byte-level BPE token may hold part of a character (a lead byte, or continuation bytes). Each step allows
    only the tokens whose bytes continue the sequence's bytes as valid UTF-8 (`utf8_shape`), and a token that
    leaves a character unfinished only if some tokens can finish it and (``max_length``: the sequence length
    ``generate`` stops at) a step is left to do so. Tokenizers that are not byte-level (characters, words) need
    nothing: `for_tokenizer` returns `None` for them.

    Example:

    ```python
    >>> tok = train_bpe_tokenizer(["café crème brûlée\\n"] * 40, vocab_size=262)
    >>> keep = WholeCharacters.for_tokenizer(tok, max_length=8)
    >>> lead = tok.convert_tokens_to_ids("Ã")  # the byte 0xC3 alone: the first half of é
    >>> scores = torch.zeros(1, len(tok))
    >>> allowed = keep(torch.tensor([[lead]]), scores.clone()).isfinite()[0]
    >>> sorted({bytes([byte_level_symbols()[s] for s in tok.convert_ids_to_tokens(i)])[0] >> 6 for i in
    ...          allowed.nonzero()[:, 0].tolist()})  # every allowed token starts with a continuation byte (0b10)
    [2]
    >>> WholeCharacters.for_tokenizer(character_tokenizer({"<unk>": 0, "a": 1})) is None
    True

    ```
    """

    def __init__(self, token_bytes, max_length=None):
        self.token_bytes, self.max_length = token_bytes, max_length
        index = {state: i for i, state in enumerate(STATES)}
        # allowed[s, t]: token t may follow a stream standing at STATES[s]; then[s, t]: where it stands after t.
        allowed = torch.zeros(len(STATES), len(token_bytes), dtype=torch.bool)
        then = torch.zeros(len(STATES), len(token_bytes), dtype=torch.long)
        for token, data in enumerate(token_bytes):
            for s, state in enumerate(STATES):
                if data is None:  # a special token: no bytes, allowed between characters
                    allowed[s, token] = s == 0
                    continue
                after = utf8_shape(data, state) if data else None
                if after is not None:
                    allowed[s, token], then[s, token] = True, index[after]
        # steps[s]: the fewest tokens that take a stream standing at STATES[s] back between characters.
        steps = torch.full((len(STATES),), len(STATES) + 1)
        steps[0] = 0
        for _ in STATES:
            reachable = torch.where(allowed, steps[then] + 1, len(STATES) + 1)
            steps = torch.minimum(steps, reachable.min(1).values)
        self.allowed, self.then, self.steps = allowed, then, steps
        self._index = index

    def mask(self, state, remaining=None):
        """(V,) bool: the tokens allowed at ``STATES[state]`` with ``remaining`` tokens still to generate, this one
        included (`None`: no limit): each must leave a state that the tokens after it can still finish."""
        limit = len(STATES) if remaining is None else remaining - 1
        return self.allowed[state] & (self.steps[self.then[state]] <= limit)

    @classmethod
    def for_tokenizer(cls, tokenizer, max_length=None):
        """The processor for a byte-level BPE ``tokenizer`` (`None` for one that always decodes whole characters)."""
        backend = getattr(tokenizer, "backend_tokenizer", None)
        if backend is None or "ByteLevel" not in type(backend.decoder).__name__:
            return None
        symbols = byte_level_symbols()
        special = set(tokenizer.all_special_ids)
        token_bytes = []
        for index, token in enumerate(tokenizer.convert_ids_to_tokens(list(range(len(tokenizer))))):
            known = token is not None and index not in special and all(symbol in symbols for symbol in token)
            token_bytes.append(bytes(symbols[symbol] for symbol in token) if known else None)
        return cls(token_bytes, max_length)

    def state(self, ids):
        """Where the bytes of the token sequence ``ids`` leave the stream (an index into `STATES`). The last 4
        tokens decide (each holds at least a byte, and an unfinished character has at most 3): their bytes are
        read from the first that does not continue an earlier character."""
        data = b"".join(self.token_bytes[i] or b"" for i in ids[-4:] if i < len(self.token_bytes))
        start = next((k for k, byte in enumerate(data) if not 0x80 <= byte < 0xC0), len(data))
        return self._index[utf8_shape(data[start:]) or STATES[0]]

    def __call__(self, input_ids, scores):
        remaining = None if self.max_length is None else self.max_length - input_ids.shape[1]
        width = min(scores.shape[1], self.allowed.shape[1])
        for row, ids in enumerate(input_ids.tolist()):
            allowed = self.mask(self.state(ids), remaining)[:width]
            if allowed.any():  # (a prompt that ends where nothing can finish its character is left alone)
                scores[row, :width] = scores[row, :width].masked_fill(~allowed.to(scores.device), float("-inf"))
        return scores


__all__ = [
    "WholeCharacters",
    "byte_level_symbols",
    "character_tokenizer",
    "full_width_folding",
    "is_character_vocabulary",
    "save_tokenizer",
    "tokenizer_from_json",
    "train_bpe_tokenizer",
    "train_character_tokenizer",
    "utf8_shape",
    "STATES",
]
