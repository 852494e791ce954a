"""Text corpora in, tokenized training samples out: reading, checking and splitting text files, and the
`datasets` pipeline (``load_dataset("text")``, batched tokenization, packing into fixed-length samples).

Corpus text files are UTF-8. Decoding is strict by default: an invalid byte raises `CorpusError` naming the file
and the byte offset; with ``encoding_errors="replace"`` every invalid byte sequence becomes U+FFFD instead. A NUL
byte means a binary file and is always an error, and so is a file with no text. Newlines are normalised to
``"\\n"`` and a leading byte-order mark is dropped.

**Documents.** Every file is a document, and inside a file a line holding only `DOCUMENT_SEPARATOR`
(``<|endoftext|>``) ends one document and starts the next (`write_corpus_split` writes such lines between files,
and ``brillm prepare-corpus`` between plays, books, articles and poems). No sample ever spans a separator.

**Samples.** The text is tokenized line by line (the ``"\\n"`` kept, so line breaks are tokens) and packed into
samples of exactly ``seq_len`` tokens (reference: 32):

- ``pack="blocks"`` (default): the tokens of each run of lines are cut into blocks that overlap by one token
  (block k+1 starts with the last token of block k), so every bigram of the run is predicted exactly once. A run
  ends at a document separator and at the end of a `map` batch (``batch_size`` rows, 4096 by default: one row per
  line, and a line longer than `MAX_ROW_CHARS` characters is one row per piece, see `load_text`): the last block
  of a run is padded.
- ``pack="lines"``: every line is its own run (sentence-bounded samples, as the reference trained on sentences).

Columns: ``input_ids`` (int64, ``seq_len``; right-padded with the tokenizer's pad id), ``attention_mask`` (int8, 0
on padding), ``labels`` (int64, ``input_ids`` with -100 on padding; the model shifts them inside) and ``num_chars``
(int32): the characters covered by the tokens a sample scores (all its real tokens but the first), so that
``bits/char = sum(loss_nats) / ln 2 / sum(num_chars)``, summed over all scored tokens. Runs of one token score
nothing and are dropped.

Example:

```python
>>> import tempfile
>>> from pathlib import Path
>>> from modeling_brillm.tokenization_brillm import train_character_tokenizer
>>> folder = Path(tempfile.mkdtemp())
>>> _ = (folder / "a.txt").write_text("to be or not to be\\nthat is the question\\n")
>>> summary = write_corpus_split([folder / "a.txt"], [], folder / "text", validation_fraction=0.5)
>>> tokenizer = train_character_tokenizer(iter_lines(folder / "text" / "train.txt"))
>>> samples = tokenize_and_pack(load_text(folder / "text"), tokenizer, seq_len=8)
>>> samples["train"].column_names
['input_ids', 'attention_mask', 'labels', 'num_chars']
>>> sum(samples["train"]["num_chars"]) == len("to be or not to be\\n") - 1  # the first character is never scored
True

```
"""

import codecs
import os
from pathlib import Path

import numpy as np

DOCUMENT_SEPARATOR = "<|endoftext|>"
PACKING_MODES = ("blocks", "lines")
_CHUNK_BYTES = 1 << 20
_ENCODE_CHARS = 1 << 18  # rows are tokenized together up to this many characters
MAX_ROW_CHARS = 1 << 12  # a longer line is split into rows of at most this many characters (`split_line`)


class CorpusError(ValueError):
    """A corpus file or folder that cannot be used as training text (the message names the file)."""


def corpus_files(paths):
    """The text files named by ``paths`` (files, or folders searched recursively; hidden names skipped), sorted
    within each folder. Raises `CorpusError` for a missing path or when no file is found.

    Example:

    ```python
    >>> import tempfile
    >>> from pathlib import Path
    >>> folder = Path(tempfile.mkdtemp())
    >>> for name in ("b.txt", "a.txt", ".hidden"):
    ...     _ = (folder / name).write_text("text\\n")
    >>> [path.name for path in corpus_files([folder])]
    ['a.txt', 'b.txt']

    ```
    """
    if isinstance(paths, (str, os.PathLike)):
        paths = [paths]
    files = []
    for path in map(Path, paths):
        if path.is_dir():
            found = sorted(
                file
                for file in path.rglob("*")
                if file.is_file() and not any(part.startswith(".") for part in file.relative_to(path).parts)
            )
            if not found:
                raise CorpusError(f"corpus folder {path} holds no files.")
            files.extend(found)
        elif path.is_file():
            files.append(path)
        else:
            raise CorpusError(f"corpus path {path} does not exist.")
    if not files:
        raise CorpusError("no corpus files given.")
    return files


def read_text(path, encoding_errors="strict"):
    """Yield the text of a UTF-8 file in chunks (about 1 MB), newlines normalised to ``"\\n"``, BOM dropped.

    Raises `CorpusError` naming the file and byte offset for invalid UTF-8 (unless ``encoding_errors="replace"``,
    which puts U+FFFD in place of each invalid sequence), for a NUL byte (a binary file), and for a file without
    any non-whitespace text.

    Example:

    ```python
    >>> import tempfile
    >>> from pathlib import Path
    >>> path = Path(tempfile.mkdtemp()) / "bad.txt"
    >>> _ = path.write_bytes("café\\r\\n".encode() + b"\\xff")
    >>> list(read_text(path, encoding_errors="replace"))
    ['café\\n\\ufffd']
    >>> list(read_text(path))
    Traceback (most recent call last):
    ...
    modeling_brillm.data.CorpusError: ... is not valid UTF-8 at byte offset 7 (invalid start byte); fix the file or use encoding_errors="replace" (--encoding-errors replace) to put U+FFFD in place of invalid bytes.

    ```
    """
    if encoding_errors not in ("strict", "replace"):
        raise ValueError(f'encoding_errors must be "strict" or "replace"; got {encoding_errors!r}.')
    path = Path(path)
    decoder = codecs.getincrementaldecoder("utf-8")(errors=encoding_errors)
    consumed, carry, has_text, first = 0, "", False, True
    with open(path, "rb") as file:
        while True:
            block = file.read(_CHUNK_BYTES)
            nul = block.find(b"\0")
            if nul >= 0:
                raise CorpusError(
                    f"{path} has a NUL byte at byte offset {consumed + nul}: it looks like a binary file, not UTF-8 text."
                )
            buffered = len(decoder.getstate()[0])
            try:
                text = decoder.decode(block, final=not block)
            except UnicodeDecodeError as error:
                raise CorpusError(
                    f"{path} is not valid UTF-8 at byte offset {consumed - buffered + error.start} ({error.reason}); fix the file "
                    'or use encoding_errors="replace" (--encoding-errors replace) to put U+FFFD in place of invalid bytes.'
                ) from None
            consumed += len(block)
            if first and text:
                text, first = text.removeprefix("\ufeff"), False
            text = carry + text
            carry = "\r" if block and text.endswith("\r") else ""  # a "\r\n" may straddle two blocks
            text = text[: len(text) - len(carry)].replace("\r\n", "\n").replace("\r", "\n")
            has_text = has_text or not text.isspace() and text != ""
            if text:
                yield text
            if not block:
                break
    if not has_text:
        raise CorpusError(f"{path} is empty (no text besides whitespace): remove it from the corpus.")


def iter_lines(path, encoding_errors="strict", skip_separators=True, max_chars=None):
    """Yield the lines of a text file, each ending in ``"\\n"``; document separator lines are skipped unless
    ``skip_separators=False``. Same checks as `read_text`. With ``max_chars``, a longer line comes in pieces
    (`split_line`; only the last ends in ``"\\n"``), so memory stays bounded whatever the line length.

    Example:

    ```python
    >>> import tempfile
    >>> from pathlib import Path
    >>> path = Path(tempfile.mkdtemp()) / "a.txt"
    >>> _ = path.write_text("one\\n<|endoftext|>\\ntwo three four")
    >>> list(iter_lines(path)), len(list(iter_lines(path, skip_separators=False)))
    (['one\\n', 'two three four\\n'], 3)
    >>> list(iter_lines(path, max_chars=8))
    ['one\\n', 'two', ' three', ' four\\n']

    ```
    """
    parts = []  # the current line so far, one string per chunk (joined once: no quadratic concatenation)
    pending = 0
    for text in read_text(path, encoding_errors):
        lines = text.split("\n")
        for line in lines[:-1]:
            parts.append(line)
            line = "".join(parts) + "\n"
            parts, pending = [], 0
            if not (skip_separators and line.strip() == DOCUMENT_SEPARATOR):
                yield from split_line(line, max_chars) if max_chars else (line,)
        parts.append(lines[-1])
        pending += len(lines[-1])
        if max_chars and pending > 2 * max_chars:  # a very long line: give out its complete pieces now
            pieces = split_line("".join(parts), max_chars)
            yield from pieces[:-1]
            parts, pending = [pieces[-1]], len(pieces[-1])
    rest = "".join(parts)
    if rest and not (skip_separators and rest.strip() == DOCUMENT_SEPARATOR):
        yield from split_line(rest + "\n", max_chars) if max_chars else (rest + "\n",)


def split_line(line, max_chars=None):
    """``line`` cut into pieces of at most ``max_chars`` characters (default `MAX_ROW_CHARS`), each cut made
    before a space that follows a non-space where the piece has one, so that word-level pre-tokenization (byte-level
    BPE) gives the same tokens piece by piece as on the whole line. A line that fits is returned whole.

    Example:

    ```python
    >>> split_line("the cat sat on\\n", max_chars=8)
    ['the cat', ' sat on\\n']
    >>> split_line("abcdefg", max_chars=3)
    ['abc', 'def', 'g']

    ```
    """
    max_chars = max_chars or MAX_ROW_CHARS
    pieces, start = [], 0
    while len(line) - start > max_chars:
        end = start + max_chars
        cut = line.rfind(" ", start + 1, end + 1)
        while cut > start and line[cut - 1].isspace():
            cut = line.rfind(" ", start + 1, cut)
        cut = cut if cut > start else end
        pieces.append(line[start:cut])
        start = cut
    pieces.append(line[start:])
    return pieces


def write_corpus_split(train_files, valid_files, output_dir, validation_fraction=0.05, encoding_errors="strict"):
    """Check and normalise corpus files into ``output_dir/train.txt`` and ``output_dir/valid.txt``.

    Every file is read with `read_text`'s checks; documents (files, and the parts between separator lines) are
    written with leading and trailing blank lines removed and one `DOCUMENT_SEPARATOR` line between two documents.
    Without ``valid_files``, the last ``validation_fraction`` of the non-blank lines of every document (at least one)
    is held out for validation; a document of one line stays whole in training. Returns ``{"train": ..., "validation": ...}`` with the
    documents, lines and characters written to each.

    Example:

    ```python
    >>> import tempfile
    >>> from pathlib import Path
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "a.txt").write_text("one\\ntwo\\nthree\\nfour\\n")
    >>> _ = (folder / "b.txt").write_text("\\nuno\\ndos\\n<|endoftext|>\\nsolo\\n")
    >>> write_corpus_split([folder / "a.txt", folder / "b.txt"], [], folder / "out", validation_fraction=0.25)["train"]
    {'documents': 3, 'lines': 5, 'characters': 23}
    >>> (folder / "out" / "train.txt").read_text()
    'one\\ntwo\\nthree\\n<|endoftext|>\\nuno\\n<|endoftext|>\\nsolo\\n'
    >>> (folder / "out" / "valid.txt").read_text()
    'four\\n<|endoftext|>\\ndos\\n'

    ```
    """
    if not 0 < validation_fraction < 1:
        raise ValueError(f"validation_fraction must lie strictly between 0 and 1; got {validation_fraction}.")
    output_dir = Path(output_dir)
    output_dir.mkdir(parents=True, exist_ok=True)
    train_files, valid_files = list(train_files), list(valid_files)
    with _DocumentWriter(output_dir / "train.txt") as train, _DocumentWriter(output_dir / "valid.txt") as valid:
        if valid_files:
            for line in _document_lines(train_files, encoding_errors):
                train.write(line)
            for line in _document_lines(valid_files, encoding_errors):
                valid.write(line)
        else:
            lengths, length = [], 0  # non-blank lines of every document
            for line in _document_lines(train_files, encoding_errors):
                if line is None:
                    lengths.append(length)
                    length = 0
                elif not line.isspace():
                    length += 1
            document, index, side = 0, 0, train
            for line in _document_lines(train_files, encoding_errors):
                if line is None:
                    train.write(None)
                    valid.write(None)
                    document, index, side = document + 1, 0, train
                    continue
                if not line.isspace():
                    n = lengths[document]
                    if n > 1 and index >= n - max(1, round(validation_fraction * n)):
                        side = valid
                    index += 1
                side.write(line)
    summary = {"train": train.summary(), "validation": valid.summary()}
    if summary["train"]["characters"] == 0:
        raise CorpusError("the corpus has no training text left after the validation split; give more text.")
    if summary["validation"]["characters"] == 0:
        raise CorpusError(
            "the validation split is empty (every document has a single line); give validation files or split the text into lines."
        )
    return summary


def _document_lines(files, encoding_errors):
    """Lines of the files in order, `None` at the end of every document."""
    for path in files:
        for line in iter_lines(path, encoding_errors, skip_separators=False):
            yield None if line.strip() == DOCUMENT_SEPARATOR else line
        yield None


class _DocumentWriter:
    """Writes documents line by line (`None` ends one), trimming blank lines at their edges, separators between."""

    def __init__(self, path):
        self.path = path
        self.documents = self.lines = self.characters = 0
        self._blank, self._in_document = [], False

    def __enter__(self):
        self._file = open(self.path, "w", encoding="utf-8", newline="\n")
        return self

    def __exit__(self, *exc_info):
        self._file.close()

    def write(self, line):
        if line is None:
            self._blank, self._in_document = [], False
        elif line.isspace():
            if self._in_document:
                self._blank.append(line)
        else:
            if not self._in_document:
                if self.documents:
                    self._file.write(DOCUMENT_SEPARATOR + "\n")
                self.documents += 1
                self._in_document = True
            for text in (*self._blank, line):
                self._file.write(text)
                self.lines += 1
                self.characters += len(text)
            self._blank = []

    def summary(self):
        return {"documents": self.documents, "lines": self.lines, "characters": self.characters}


# ----------------------------------------------------------------------------------------------------------------
# The datasets pipeline


def load_text(text_dir, streaming=False, cache_dir=None):
    """``load_dataset("text")`` of ``text_dir/train.txt`` and ``text_dir/valid.txt`` (splits ``train`` and
    ``validation``), one row per line with its ``"\\n"`` kept. Works offline (``HF_DATASETS_OFFLINE=1``).
    ``streaming=True`` returns an `IterableDatasetDict` that reads the files lazily. See the module docstring for
    an example with `tokenize_and_pack`.

    A line longer than `MAX_ROW_CHARS` characters spans several rows (`split_line`; only the last ends in
    ``"\\n"``), so that a `map` batch holds at most ``batch_size * MAX_ROW_CHARS`` characters, whatever the
    length of a line."""
    import pyarrow.compute as pc
    from datasets import load_dataset

    text_dir = Path(text_dir)
    data_files = {"train": str(text_dir / "train.txt"), "validation": str(text_dir / "valid.txt")}
    for path in data_files.values():
        if not Path(path).is_file():
            raise CorpusError(f"{path} is missing: write it with write_corpus_split() (or `brillm prepare`).")
    dataset = load_dataset("text", data_files=data_files, keep_linebreaks=True, streaming=streaming, cache_dir=cache_dir)
    for name, split in dataset.items():
        if streaming or len(split) and pc.max(pc.utf8_length(split.data.column("text"))).as_py() > MAX_ROW_CHARS:
            dataset[name] = split.map(_split_rows, batched=True, batch_size=64)
    return dataset


def _split_rows(batch):
    return {"text": [piece for line in batch["text"] for piece in split_line(line)]}


def tokenize_and_pack(dataset, tokenizer, seq_len=32, pack="blocks", num_proc=None, batch_size=4096):
    """Tokenize a line dataset (`load_text`) and pack it into samples of exactly ``seq_len`` tokens.

    Works on a `Dataset`/`DatasetDict` (``num_proc`` worker processes) and on their streaming counterparts (lazy,
    ``num_proc`` ignored). See the module docstring for the packing rules, the output columns and an example.
    """
    from datasets import DatasetDict, Features, IterableDataset, IterableDatasetDict, List, Value

    if pack not in PACKING_MODES:
        raise ValueError(f"pack must be one of {PACKING_MODES}; got {pack!r}.")
    if seq_len < 2:
        raise ValueError(f"seq_len must be at least 2 (a sample scores its tokens after the first); got {seq_len}.")
    if tokenizer.pad_token_id is None:
        raise ValueError("the tokenizer has no pad token; samples are padded to seq_len with it.")
    features = Features(
        {
            "input_ids": List(Value("int64"), length=seq_len),
            "attention_mask": List(Value("int8"), length=seq_len),
            "labels": List(Value("int64"), length=seq_len),
            "num_chars": Value("int32"),
        }
    )
    streaming = isinstance(dataset, (IterableDataset, IterableDatasetDict))
    packer = _Packer(tokenizer.backend_tokenizer, tokenizer.pad_token_id, seq_len, pack, as_lists=streaming)
    options = {"batched": True, "batch_size": batch_size, "remove_columns": ["text"], "features": features}
    if not streaming:
        options.update(num_proc=num_proc, desc="tokenize and pack")
    if isinstance(dataset, (DatasetDict, IterableDatasetDict)):
        return type(dataset)({name: split.map(packer, **options) for name, split in dataset.items()})
    return dataset.map(packer, **options)


class _Packer:
    """The batched `map` function: lines in, fixed-length samples out (picklable for ``num_proc``).

    Rows are encoded in groups of at most ``_ENCODE_CHARS`` characters and full blocks leave the current run as
    soon as they are complete, so the memory of a call grows with its output, never with the length of a run."""

    def __init__(self, tokenizer, pad_token_id, seq_len, pack, as_lists=False):
        self.tokenizer, self.pad_token_id, self.seq_len, self.pack = tokenizer, pad_token_id, seq_len, pack
        self.as_lists = as_lists  # streaming `map` hands rows on as returned: lists there, like a stored dataset

    def __call__(self, batch):
        samples = {"input_ids": [], "attention_mask": [], "labels": [], "num_chars": []}
        packed = []  # the samples of each group as numpy arrays (a tenth of the memory of Python lists)
        ids, ends, start = [], [], 0  # the current run: token ids, their end characters, the run's length so far
        for group in _groups(batch["text"]):
            lines = [line for line in group if line.strip() != DOCUMENT_SEPARATOR]
            encodings = iter(self.tokenizer.encode_batch(lines, add_special_tokens=False))
            for line in group:
                if line.strip() == DOCUMENT_SEPARATOR:
                    self._emit(ids, ends, samples)
                    ids, ends, start = [], [], 0
                    continue
                encoding = next(encodings)
                ids.extend(encoding.ids)
                ends.extend(start + end for _, end in encoding.offsets)
                start += len(line)
                if self.pack == "lines" and line.endswith("\n"):  # a row without "\n" is a piece of a long line
                    self._emit(ids, ends, samples)
                    ids, ends, start = [], [], 0
            done = self._emit(ids, ends, samples, complete_only=True)
            ids, ends = ids[done:], ends[done:]
            packed.append(self._to_arrays(samples))
        self._emit(ids, ends, samples)
        packed.append(self._to_arrays(samples))
        arrays = {name: np.concatenate([part[name] for part in packed]) for name in packed[0]}
        return {name: array.tolist() for name, array in arrays.items()} if self.as_lists else arrays

    def _to_arrays(self, samples):
        """The collected samples as arrays of the output dtypes; empties ``samples``."""
        dtypes = {"input_ids": np.int64, "attention_mask": np.int8, "labels": np.int64, "num_chars": np.int32}
        arrays = {name: np.array(values, dtype=dtypes[name]) for name, values in samples.items()}
        for name in ("input_ids", "attention_mask", "labels"):
            arrays[name] = arrays[name].reshape(-1, self.seq_len)  # (samples, seq_len), also when there are none
        for values in samples.values():
            values.clear()
        return arrays

    def _emit(self, ids, ends, samples, complete_only=False):
        """Append the blocks of a run (all of them, or only those followed by more tokens of it); returns the
        number of leading tokens no later block needs."""
        L, stride = self.seq_len, self.seq_len - 1
        last = len(ids) - L if complete_only else len(ids) - 1
        begin = 0
        for begin in range(0, max(last, 0), stride):
            block = ids[begin : begin + L]
            n = len(block)
            padding = [self.pad_token_id] * (L - n)
            samples["input_ids"].append(block + padding)
            samples["attention_mask"].append([1] * n + [0] * (L - n))
            samples["labels"].append(block + [-100] * (L - n))
            samples["num_chars"].append(ends[begin + n - 1] - ends[begin])
        return begin + stride if last > 0 else 0


def _groups(rows, max_chars=None):
    """Consecutive rows in groups of at most ``max_chars`` characters (``_ENCODE_CHARS``; a longer row alone)."""
    max_chars = max_chars or _ENCODE_CHARS
    group, size = [], 0
    for row in rows:
        if group and size + len(row) > max_chars:
            yield group
            group, size = [], 0
        group.append(row)
        size += len(row)
    if group:
        yield group


__all__ = [
    "DOCUMENT_SEPARATOR",
    "CorpusError",
    "corpus_files",
    "MAX_ROW_CHARS",
    "iter_lines",
    "load_text",
    "read_text",
    "split_line",
    "tokenize_and_pack",
    "write_corpus_split",
]


def sample_tensors(split):
    """A split of packed samples as tensors: ``input_ids`` and ``attention_mask`` (all ones when the split has
    none), (N, L) int64, and ``num_chars`` (N,) float64 when the split records it (bits/char).

    Example:

    ```python
    >>> from datasets import Dataset
    >>> tensors = sample_tensors(Dataset.from_dict({"input_ids": [[1, 2, 3], [4, 5, 0]], "num_chars": [2, 1]}))
    >>> tensors["attention_mask"].tolist(), tensors["num_chars"].tolist()
    ([[1, 1, 1], [1, 1, 1]], [2.0, 1.0])

    ```
    """
    import torch

    columns = split.with_format("numpy")[:]

    def column(name, dtype):
        return torch.from_numpy(np.asarray(columns[name], dtype=dtype).reshape(len(split), -1))

    tensors = {"input_ids": column("input_ids", np.int64)}
    if "attention_mask" in split.column_names:
        tensors["attention_mask"] = column("attention_mask", np.int64)
    else:
        tensors["attention_mask"] = torch.ones_like(tensors["input_ids"])
    if "num_chars" in split.column_names:
        tensors["num_chars"] = column("num_chars", np.float64).view(-1)
    return tensors

