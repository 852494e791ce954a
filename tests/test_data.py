"""Corpus reading and splitting, tokenizer training, and the datasets pipeline (packing, documents, num_chars,
streaming, worker processes)."""

from collections import Counter

import numpy as np
import pytest
from transformers import AutoTokenizer

from modeling_brillm import data
from modeling_brillm.data import (
    DOCUMENT_SEPARATOR,
    CorpusError,
    corpus_files,
    iter_lines,
    load_text,
    read_text,
    tokenize_and_pack,
    write_corpus_split,
)
from modeling_brillm.preparation import count_sample_bigrams
from modeling_brillm.tokenization_brillm import save_tokenizer, train_bpe_tokenizer, train_character_tokenizer

SEP = DOCUMENT_SEPARATOR + "\n"


# ----------------------------------------------------------------------------------------------------------------
# Reading and checking files


@pytest.mark.parametrize("chunk", [1, 2, 3, 5, 1 << 20])
def test_read_text_is_independent_of_chunking(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(data, "_CHUNK_BYTES", chunk)
    path = tmp_path / "a.txt"
    path.write_bytes("\ufeff春眠不觉晓\r\nline two\rthree\r\n\r\n€ end".encode())
    assert "".join(read_text(path)) == "春眠不觉晓\nline two\nthree\n\n€ end"
    assert list(iter_lines(path)) == ["春眠不觉晓\n", "line two\n", "three\n", "\n", "€ end\n"]


@pytest.mark.parametrize("chunk", [3, 1 << 20])
def test_invalid_utf8_names_file_and_byte_offset(tmp_path, monkeypatch, chunk):
    monkeypatch.setattr(data, "_CHUNK_BYTES", chunk)
    path = tmp_path / "latin1.txt"
    path.write_bytes("春眠 ok\n".encode() + "café".encode("latin-1") + b" more\n")
    offset = len("春眠 ok\ncaf".encode())
    with pytest.raises(
        CorpusError, match=rf"latin1.txt is not valid UTF-8 at byte offset {offset} \(invalid continuation byte\)"
    ):
        list(read_text(path))
    assert "".join(read_text(path, encoding_errors="replace")) == "春眠 ok\ncaf\ufffd more\n"


def test_truncated_utf8_at_end_of_file_is_reported(tmp_path):
    path = tmp_path / "cut.txt"
    path.write_bytes("abc春".encode()[:-1])
    with pytest.raises(CorpusError, match="byte offset 3 .unexpected end of data"):
        list(read_text(path))


def test_binary_and_empty_files_are_refused(tmp_path):
    binary, empty, blank = tmp_path / "model.bin", tmp_path / "empty.txt", tmp_path / "blank.txt"
    binary.write_bytes(b"PK\x03\x04\x00\x00")
    empty.write_bytes(b"")
    blank.write_text(" \n\n\t\n")
    with pytest.raises(CorpusError, match="model.bin has a NUL byte at byte offset 4: it looks like a binary file"):
        list(read_text(binary))
    for path in (empty, blank):
        with pytest.raises(CorpusError, match=f"{path.name} is empty"):
            list(read_text(path))
    with pytest.raises(ValueError, match="encoding_errors"):
        list(read_text(blank, encoding_errors="ignore"))


def test_corpus_files(tmp_path):
    (tmp_path / "sub").mkdir()
    (tmp_path / "sub" / "b.txt").write_text("b\n")
    (tmp_path / "a.txt").write_text("a\n")
    (tmp_path / ".git").mkdir()
    (tmp_path / ".git" / "HEAD").write_text("ref\n")
    assert [p.relative_to(tmp_path).as_posix() for p in corpus_files(tmp_path)] == ["a.txt", "sub/b.txt"]
    with pytest.raises(CorpusError, match="does not exist"):
        corpus_files([tmp_path / "missing.txt"])
    (tmp_path / "void").mkdir()
    with pytest.raises(CorpusError, match="holds no files"):
        corpus_files(tmp_path / "void")


def test_split_keeps_documents_apart_and_holds_out_tails(tmp_path):
    (tmp_path / "a.txt").write_text("".join(f"a{i}\n" for i in range(20)))
    (tmp_path / "b.txt").write_text(f"\n\nb0\nb1\n\n\nb2\nb3\n{SEP}{SEP}c0\nc1\nc2\nc3\n\n")
    summary = write_corpus_split(
        [tmp_path / "a.txt", tmp_path / "b.txt"], [], tmp_path / "out", validation_fraction=0.25
    )
    train = (tmp_path / "out" / "train.txt").read_text()
    valid = (tmp_path / "out" / "valid.txt").read_text()
    assert train == "".join(f"a{i}\n" for i in range(15)) + f"{SEP}b0\nb1\n\n\nb2\n{SEP}c0\nc1\nc2\n"
    assert valid == "".join(f"a{i}\n" for i in range(15, 20)) + f"{SEP}b3\n{SEP}c3\n"
    assert summary == {
        "train": {"documents": 3, "lines": 23, "characters": len(train) - 2 * len(SEP)},
        "validation": {"documents": 3, "lines": 7, "characters": len(valid) - 2 * len(SEP)},
    }


def test_split_with_validation_files_and_its_errors(tmp_path):
    (tmp_path / "t.txt").write_text("one line only\n")
    (tmp_path / "v.txt").write_text("held out\n")
    write_corpus_split([tmp_path / "t.txt"], [tmp_path / "v.txt"], tmp_path / "out")
    assert (tmp_path / "out" / "valid.txt").read_text() == "held out\n"
    with pytest.raises(CorpusError, match="validation split is empty"):
        write_corpus_split([tmp_path / "t.txt"], [], tmp_path / "out2")
    with pytest.raises(ValueError, match="validation_fraction"):
        write_corpus_split([tmp_path / "t.txt"], [], tmp_path / "out3", validation_fraction=1.0)


# ----------------------------------------------------------------------------------------------------------------
# Tokenizers


def test_character_tokenizer_caps_vocabulary_and_round_trips(tmp_path):
    tokenizer = train_character_tokenizer(["aaaa bbb cc d\n", "ab"], vocab_size=6)
    assert tokenizer.convert_ids_to_tokens(list(range(6))) == ["<unk>", "<pad>", "a", "b", " ", "c"]
    assert (tokenizer.unk_token_id, tokenizer.pad_token_id) == (0, 1)
    assert tokenizer("dab\n", add_special_tokens=False)["input_ids"] == [0, 2, 3, 0]
    save_tokenizer(tokenizer, tmp_path)
    loaded = AutoTokenizer.from_pretrained(tmp_path)
    assert loaded("cab d")["input_ids"] == tokenizer("cab d")["input_ids"] == [5, 2, 3, 4, 0]
    with pytest.raises(ValueError, match="empty text"):
        train_character_tokenizer([])


def test_bpe_tokenizer_round_trips_and_refuses_too_small_corpora(tmp_path):
    text = ["The quick brown fox jumps over the lazy dog. 春眠不觉晓 ünïcödé 🙂\n"] * 30
    tokenizer = train_bpe_tokenizer(text, vocab_size=300)
    assert len(tokenizer) == 300 and tokenizer.convert_ids_to_tokens([0, 1]) == ["<unk>", "<pad>"]
    ids = tokenizer(text[0], add_special_tokens=False)["input_ids"]
    assert tokenizer.decode(ids) == text[0]
    save_tokenizer(tokenizer, tmp_path)
    assert AutoTokenizer.from_pretrained(tmp_path)(text[0], add_special_tokens=False)["input_ids"] == ids
    with pytest.raises(ValueError, match="too small for a BPE vocabulary of 5000 tokens: it yields only"):
        train_bpe_tokenizer(text, vocab_size=5000)
    with pytest.raises(ValueError, match="at least 258 tokens"):
        train_bpe_tokenizer(text, vocab_size=100)


# ----------------------------------------------------------------------------------------------------------------
# Packing


def write_text_dir(tmp_path, train, valid="valid text\n"):
    folder = tmp_path / "text"
    folder.mkdir()
    (folder / "train.txt").write_text(train)
    (folder / "valid.txt").write_text(valid)
    return folder


def runs_of(text, pack):
    """The runs a sample may come from: documents, or lines for pack="lines"."""
    documents = [doc for doc in text.split(SEP) if doc]
    if pack == "blocks":
        return documents
    return [line + "\n" for doc in documents for line in doc.splitlines()]


@pytest.mark.parametrize("pack", ["blocks", "lines"])
def test_packing_never_crosses_documents_and_scores_every_bigram_once(tmp_path, pack):
    # Two documents over disjoint alphabets, so a sample mixing them would show.
    doc_a = "".join("ab"[i % 2] * (1 + i % 5) + "\n" for i in range(40))
    doc_b = "".join("xyz"[i % 3] * (2 + i % 7) + "\n" for i in range(30))
    train = doc_a + SEP + doc_b
    tokenizer = train_character_tokenizer([train])
    samples = tokenize_and_pack(load_text(write_text_dir(tmp_path, train)), tokenizer, seq_len=8, pack=pack)["train"]

    ids, mask, labels = (np.array(samples[c]) for c in ("input_ids", "attention_mask", "labels"))
    assert ids.shape[1] == mask.shape[1] == labels.shape[1] == 8
    assert (mask.sum(1) >= 2).all()
    assert (labels == np.where(mask == 1, ids, -100)).all()
    assert (ids[mask == 0] == tokenizer.pad_token_id).all()
    assert (mask[:, :-1] >= mask[:, 1:]).all()  # right padding
    letters = [set(tokenizer.convert_ids_to_tokens(row[m == 1].tolist())) - {"\n"} for row, m in zip(ids, mask)]
    assert all(s <= set("ab") or s <= set("xyz") for s in letters)

    # Every bigram inside a run is scored exactly once; num_chars adds up to the characters after each run's first.
    runs = runs_of(train, pack)
    expected = Counter(pair for run in runs for pair in zip(run, run[1:]))
    seen = Counter()
    for row, m in zip(ids, mask):
        tokens = tokenizer.convert_ids_to_tokens(row[m == 1].tolist())
        seen.update(zip(tokens, tokens[1:]))
    assert seen == expected
    assert sum(samples["num_chars"]) == sum(len(run) - 1 for run in runs)


def test_num_chars_with_byte_level_bpe_on_multibyte_text(tmp_path):
    train = "春眠不觉晓，处处闻啼鸟。\n夜来风雨声，花落知多少。\n" * 10 + SEP + "café au lait 🙂\n" * 5
    tokenizer = train_bpe_tokenizer([train], vocab_size=270)
    samples = tokenize_and_pack(load_text(write_text_dir(tmp_path, train)), tokenizer, seq_len=6)["train"]
    assert len(tokenizer.backend_tokenizer.encode("春").ids) > 1  # byte tokens, each ending where "春" ends
    # The first token of each document is not scored.
    first = [tokenizer.backend_tokenizer.encode(doc.split("\n")[0]).offsets[0][1] for doc in train.split(SEP)]
    assert sum(samples["num_chars"]) == len(train) - len(SEP) - sum(first)


def test_runs_are_cut_at_batch_ends_only(tmp_path):
    train = "".join(f"line {i}\n" for i in range(50))
    tokenizer = train_character_tokenizer([train])
    text = load_text(write_text_dir(tmp_path, train))
    whole = tokenize_and_pack(text, tokenizer, seq_len=16)["train"]
    cut = tokenize_and_pack(text, tokenizer, seq_len=16, batch_size=10)["train"]
    assert sum(whole["num_chars"]) == len(train) - 1
    assert sum(cut["num_chars"]) == len(train) - 5  # five batches, five unscored first characters


def test_streaming_and_worker_processes_give_the_same_samples(tmp_path):
    train = "".join(f"{i} bottles of beer on the wall\n" for i in range(300)) + SEP + "the end\n"
    tokenizer = train_character_tokenizer([train])
    folder = write_text_dir(tmp_path, train)
    reference = tokenize_and_pack(load_text(folder), tokenizer, seq_len=12, batch_size=64)
    parallel = tokenize_and_pack(load_text(folder), tokenizer, seq_len=12, batch_size=64, num_proc=2)
    streamed = tokenize_and_pack(load_text(folder, streaming=True), tokenizer, seq_len=12, batch_size=64)
    for split in ("train", "validation"):
        assert parallel[split].to_list() == reference[split].to_list()
        assert list(streamed[split]) == reference[split].to_list()
    # The graph can be counted straight from the stream, without writing the dataset.
    V = len(tokenizer)
    streamed_counts, _ = count_sample_bigrams(streamed["train"], V, batch_size=50)
    counts, _ = count_sample_bigrams(reference["train"], V)
    assert [a.tolist() for a in streamed_counts.result()] == [a.tolist() for a in counts.result()]
    assert counts.num_pairs == sum(reference["train"]["num_chars"])  # one character per scored token


def test_packing_arguments_are_checked(tmp_path):
    tokenizer = train_character_tokenizer(["abc\n"])
    text = load_text(write_text_dir(tmp_path, "abc\n"))
    with pytest.raises(ValueError, match="pack must be one of"):
        tokenize_and_pack(text, tokenizer, pack="sentences")
    with pytest.raises(ValueError, match="seq_len must be at least 2"):
        tokenize_and_pack(text, tokenizer, seq_len=1)
    with pytest.raises(CorpusError, match="train.txt is missing"):
        load_text(tmp_path)
