"""Smoke test of the quality study (benchmarks/quality.py): the quick recipe end to end on the bundled corpus.

The KenLM rows need a KenLM build in ~/.cache/brillm/kenlm (`python benchmarks/quality.py --install-kenlm`, which
.ci/run does first: apt-get + cmake, about 2 minutes once per machine). Without one the study skips the n-grams and
`test_kenlm_rows` is reported as skipped with the reason.
"""

import importlib.util
import json
import math
import subprocess
import sys
import time

import pytest

from conftest import REPO_ROOT

QUICK = REPO_ROOT / "configuration" / "quality" / "quick.yaml"


def _quality_module():
    spec = importlib.util.spec_from_file_location("quality", REPO_ROOT / "benchmarks" / "quality.py")
    module = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(module)
    return module


@pytest.fixture(scope="module")
def quick_study(tmp_path_factory):
    output = tmp_path_factory.mktemp("quality") / "quick"
    started = time.perf_counter()
    result = subprocess.run(
        [sys.executable, str(REPO_ROOT / "benchmarks" / "quality.py"), "--config", str(QUICK),
         "--output-dir", str(output), "--no-install-kenlm"],
        capture_output=True, text=True, cwd=REPO_ROOT, timeout=600,
    )  # fmt: skip
    seconds = time.perf_counter() - started
    assert result.returncode == 0, f"quality.py failed ({result.returncode}):\n{result.stdout[-3000:]}\n{result.stderr[-3000:]}"
    results = json.loads((output / "results.json").read_text())
    return {"output": output, "results": results, "stdout": result.stdout, "seconds": seconds}


def test_quick_study_reports_every_model(quick_study):
    results, output = quick_study["results"], quick_study["output"]
    names = {row["name"] for row in results["rows"]}
    recipe_runs = {run["name"] for run in results["recipe"]["brillm"]}
    assert recipe_runs <= names
    assert {"gpt2 (equal tokens)", "gpt2 (equal wall-clock)"} <= names
    for row in results["rows"]:
        for metrics in row["metrics"].values():
            assert math.isfinite(metrics["bits_per_char"]) and metrics["bits_per_char"] > 0, row["name"]
            assert metrics["perplexity"] > 1, row["name"]
    table = (output / "results.md").read_text()
    for title in ("BriLLM, GPT-2 and KenLM", "graph density", "last energy", "sampled objective"):
        assert title in table
    png = (output / "quality.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) < 200_000
    print(f"quick quality study: {quick_study['seconds']:.0f} s")


def test_every_model_is_scored_on_the_same_tokens(quick_study):
    """The comparison's premise: one set of scored tokens and characters per validation set, for every model."""
    results = quick_study["results"]
    for name, summary in results["validation"].items():
        seen = {(row["metrics"][name]["tokens"], row["metrics"][name]["characters"]) for row in results["rows"]}
        assert len(seen) == 1, (name, seen)
        assert seen.pop()[1] == summary["characters"]


def test_gpt2_is_matched_to_the_reference_run(quick_study):
    rows = {row["name"]: row for row in quick_study["results"]["rows"]}
    reference = next(run["name"] for run in quick_study["results"]["recipe"]["brillm"] if run["reference"])
    assert rows["gpt2 (equal tokens)"]["train_tokens"] == rows[reference]["train_tokens"]
    assert rows["gpt2 (equal wall-clock)"]["seconds"] >= rows[reference]["seconds"]


def test_kenlm_rows(quick_study):
    results = quick_study["results"]
    if results.get("kenlm_skipped"):
        pytest.skip(f"KenLM not run: {results['kenlm_skipped']}")
    kenlm = {row["name"]: row for row in results["rows"] if row["kind"] == "kenlm"}
    assert {"kenlm-2", "kenlm-3", "kenlm-5", "kenlm-3 (equal tokens)"} <= set(kenlm)
    primary = results["primary"]
    bits = [kenlm[f"kenlm-{order}"]["metrics"][primary]["bits_per_char"] for order in (2, 3)]
    assert bits[1] < bits[0]  # a trigram beats a bigram on 0.5 M tokens of Shakespeare


def test_training_runs_rebuild_the_token_stream(tmp_path):
    """The n-grams are trained on the runs the packed samples were cut from (blocks overlap by one token)."""
    from transformers import PreTrainedTokenizerFast

    from modeling_brillm.data import load_text, sample_tensors, tokenize_and_pack, write_corpus_split
    from modeling_brillm.tokenization_brillm import train_character_tokenizer

    quality = _quality_module()
    source = tmp_path / "a.txt"
    source.write_text("to be or not to be, that is the question\n" * 5 + "<|endoftext|>\nwhether 'tis nobler\n")
    write_corpus_split([source], [source], tmp_path / "text")
    tokenizer = train_character_tokenizer(iter(source.read_text().splitlines(keepends=True)))
    assert isinstance(tokenizer, PreTrainedTokenizerFast)
    samples = tokenize_and_pack(load_text(tmp_path / "text", cache_dir=tmp_path / "cache"), tokenizer, seq_len=8)
    runs = quality.training_runs(sample_tensors(samples["train"]))
    documents = source.read_text().split("<|endoftext|>\n")
    assert runs == [tokenizer(document, add_special_tokens=False)["input_ids"] for document in documents]
