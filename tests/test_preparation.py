"""``brillm prepare`` end to end: the output layout the training code loads, the graph against a brute-force count
of the samples, the bundled corpus, the command line offline, and clear errors on bad input."""

import hashlib
import json
import os
import subprocess
import sys
from collections import Counter
from pathlib import Path

import datasets
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

from modeling_brillm import BriLLMForCausalLM
from modeling_brillm.cli import main
from modeling_brillm.preparation import PreparationSettings, build_parser, prepare

REPO_ROOT = Path(__file__).resolve().parent.parent
BUNDLED = REPO_ROOT / "data" / "bundled"


@pytest.fixture(scope="module")
def prepared_zh(tmp_path_factory):
    """The bundled Chinese corpus prepared with the options the training recipes pass."""
    output = tmp_path_factory.mktemp("prepared") / "zh"
    report = prepare(
        [BUNDLED / "zh"],
        output,
        tokenizer="char",
        vocab_size=1000,
        seq_len=16,
        min_edge_count=1,
        hidden_size=8,
        validation_fraction=0.05,
        seed=0,
        log=None,
    )
    return output, report


def test_layout_is_what_training_loads(prepared_zh):
    output, report = prepared_zh
    model = BriLLMForCausalLM.from_pretrained(output / "model")
    tokenizer = AutoTokenizer.from_pretrained(output / "tokenizer")
    samples = datasets.load_from_disk(str(output / "dataset"))
    assert set(samples) == {"train", "validation"}
    assert samples["train"].column_names == ["input_ids", "attention_mask", "labels", "num_chars"]

    V = len(tokenizer)
    assert model.config.vocab_size == V == report["settings"]["vocab_size"] == 1000  # 唐诗三百首 has more characters
    assert 0 < report["unknown_token_rate"]["train"] < report["unknown_token_rate"]["validation"] < 0.2
    assert (
        (model.config.pad_token_id, model.config.unk_token_id)
        == (tokenizer.pad_token_id, tokenizer.unk_token_id)
        == (1, 0)
    )
    assert model.config.hidden_size == 8 and model.config.num_slots == report["graph"]["num_slots"]
    assert AutoTokenizer.from_pretrained(output / "model").get_vocab() == tokenizer.get_vocab()

    batch = samples["validation"].with_format("torch")[:4]
    assert batch["input_ids"].dtype == torch.int64 and batch["input_ids"].shape == (4, 16)
    output_ = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"], labels=batch["labels"])
    assert torch.isfinite(output_.loss)

    # The samples hold the text in order; a character sample scores one character per token but the first.
    text = (output / "text" / "train.txt").read_text()
    first = samples["train"][0]
    n = sum(first["attention_mask"])
    assert tokenizer(text[:n], add_special_tokens=False)["input_ids"] == first["input_ids"][:n]
    assert first["num_chars"] == n - 1  # characters of the scored tokens
    assert sum(samples["train"]["num_chars"]) <= report["corpus"]["train"]["characters"]


def test_graph_equals_brute_force_count_of_the_samples(prepared_zh):
    output, report = prepared_zh
    samples = datasets.load_from_disk(str(output / "dataset"))
    train, valid = Counter(), Counter()
    for split, counts in (("train", train), ("validation", valid)):
        for ids, mask in zip(samples[split]["input_ids"], samples[split]["attention_mask"]):
            real = ids[: sum(mask)]
            counts.update(zip(real, real[1:]))

    model = BriLLMForCausalLM.from_pretrained(output / "model")
    graph = model.get_edge_graph()
    owned = {
        (int(u), int(v))
        for u, v in zip(torch.repeat_interleave(torch.arange(graph.vocab_size), graph.degrees()), graph.col_idx)
    }
    assert owned == set(train)
    stats = json.loads((output / "graph.json").read_text())
    assert stats == report["graph"]
    assert stats["train_bigrams"] == sum(train.values())
    assert stats["num_parameters"] == model.num_parameters()
    covered = sum(count for pair, count in valid.items() if pair in train)
    assert stats["heldout"]["bigrams"] == sum(valid.values())
    assert stats["heldout"]["coverage"] == pytest.approx(covered / sum(valid.values()))


def test_bundled_corpus_matches_its_readme():
    readme = (BUNDLED / "README.md").read_text()
    total = 0
    for path in sorted(BUNDLED.glob("*/*.txt")):
        data = path.read_bytes()
        total += len(data)
        assert hashlib.sha256(data).hexdigest() in readme, path
        assert f"`{path.relative_to(BUNDLED).as_posix()}`" in readme
    assert total <= 2 * 1024 * 1024
    assert "MIT" in readme and "public domain" in readme.lower()


def test_command_line_prepares_the_bundled_corpus_offline(tmp_path):
    env = dict(
        os.environ,
        HF_DATASETS_OFFLINE="1",
        HF_HUB_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf"),
        TOKENIZERS_PARALLELISM="false",
    )
    command = [
        sys.executable,
        "-m",
        "modeling_brillm.cli",
        "prepare",
        "--corpus",
        str(BUNDLED / "en"),
        "--output",
        str(tmp_path / "en"),
    ]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    report = json.loads((tmp_path / "en" / "prepare.json").read_text())
    assert report["timings_s"]["total"] < 60
    assert report["corpus"]["train"]["documents"] == 10 and report["corpus"]["validation"]["documents"] == 1
    assert report["graph"]["heldout"]["coverage"] > 0.95  # a character graph of 1.3 M characters sees almost every pair
    assert "held-out bigram coverage" in result.stdout

    model = AutoModelForCausalLM.from_pretrained(tmp_path / "en" / "model")
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "en" / "model")
    prompt = tokenizer("To be, or not", return_tensors="pt", add_special_tokens=False)
    generated = model.generate(**prompt, max_new_tokens=5, do_sample=False, pad_token_id=tokenizer.pad_token_id)
    assert generated.shape == (1, prompt.input_ids.shape[1] + 5)


@pytest.fixture
def run_cli(capsys):
    """``brillm ARGS`` that must fail: its one stderr line (exit status 2)."""

    def run(*args):
        with pytest.raises(SystemExit) as exit_info:
            main(list(map(str, args)))
        stderr = capsys.readouterr().err
        assert exit_info.value.code == 2 and stderr.count("\n") == 1, stderr
        return stderr.strip()

    return run


def test_bad_input_gives_clear_errors(tmp_path, run_cli):
    good = tmp_path / "good.txt"
    good.write_text("".join(f"line {i} of a small corpus\n" for i in range(40)))
    (tmp_path / "empty.txt").write_text("")
    (tmp_path / "latin1.txt").write_bytes("naïve\n".encode("latin-1"))
    out = tmp_path / "out"

    assert run_cli("prepare", "--corpus", good, tmp_path / "empty.txt", "--output", out).startswith("error: ")
    assert "empty.txt is empty" in run_cli("prepare", "--corpus", good, tmp_path / "empty.txt", "--output", out)
    message = run_cli("prepare", "--corpus", tmp_path / "latin1.txt", good, "--output", out)
    assert "latin1.txt is not valid UTF-8 at byte offset 2" in message and "--encoding-errors replace" in message
    message = run_cli("prepare", "--corpus", good, "--output", out, "--tokenizer", "bpe", "--vocab-size", "4000")
    assert "too small for a BPE vocabulary of 4000 tokens" in message
    assert "does not exist" in run_cli("prepare", "--corpus", tmp_path / "missing", "--output", out)
    assert "both a training and a validation file" in run_cli(
        "prepare", "--corpus", good, "--valid", good, "--output", out
    )

    report = prepare([tmp_path / "latin1.txt", good], out, encoding_errors="replace", hidden_size=2, log=None)
    assert "\ufffd" in (out / "text" / "train.txt").read_text()
    assert report["unknown_token_rate"]["train"] == 0.0


def test_command_line_defaults_are_the_settings_defaults():
    # One place for each default: `brillm prepare` without options prepares what `prepare` does without keywords.
    import argparse
    from dataclasses import asdict

    parser = argparse.ArgumentParser()
    build_parser(parser)
    args = parser.parse_args(["--corpus", "c", "--output", "o"])
    assert {name: getattr(args, name) for name in asdict(PreparationSettings())} == asdict(PreparationSettings())
    with pytest.raises(ValueError, match="max_position_embeddings must be an integer of at least 64"):
        PreparationSettings(seq_len=64, max_position_embeddings=32)
