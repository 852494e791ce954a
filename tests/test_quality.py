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


def test_a_language_figure_draws_one_panel_per_study(quick_study, tmp_path):
    """`--figure` draws several studies' curves side by side (here the quick study twice): two panels are wider
    than one, and a figure without a study folder is refused."""
    script = [sys.executable, str(REPO_ROOT / "benchmarks" / "quality.py"), "--figure"]
    output = str(quick_study["output"])
    for panels in (1, 2):
        result = subprocess.run([*script, str(tmp_path / f"{panels}.png"), *[output] * panels],
                                capture_output=True, text=True, cwd=REPO_ROOT, timeout=120)  # fmt: skip
        assert result.returncode == 0, result.stderr[-2000:]
    widths = [int.from_bytes((tmp_path / f"{panels}.png").read_bytes()[16:20], "big") for panels in (1, 2)]
    assert widths[1] > 1.8 * widths[0], widths  # the PNG header's width
    refused = subprocess.run([*script, str(tmp_path / "none.png")], capture_output=True, text=True, cwd=REPO_ROOT)
    assert refused.returncode == 2 and "at least one study folder" in refused.stderr
    assert not (tmp_path / "none.png").exists()


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


def test_the_quality_recipes_in_the_repo_parse_and_typos_are_refused(tmp_path):
    quality = _quality_module()
    recipes = sorted((REPO_ROOT / "configuration" / "quality").glob("*.yaml"))
    assert len(recipes) >= 5
    for path in recipes:
        assert quality.load_recipe(path)["brillm"], path
    bad = tmp_path / "bad.yaml"
    bad.write_text(QUICK.read_text(encoding="utf-8").replace("seq_len:", "seq_lenght:"), encoding="utf-8")
    with pytest.raises(ValueError, match="seq_lenght"):
        quality.load_recipe(bad)
    # An option that would be ignored is refused: without converge GPT-2 has no epoch cap to stop at.
    bad.write_text(QUICK.read_text(encoding="utf-8") + "  equal_tokens: false\n", encoding="utf-8")
    with pytest.raises(ValueError, match="equal_tokens: false needs converge"):
        quality.load_recipe(bad)


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


def _epoch_study(tmp_path, brillm, gpt2):
    """``study(*extra_args)``: runs quality.py (no KenLM) on a small repetitive character corpus, 6 development
    samples, with the recipe's ``brillm`` run and ``gpt2`` settings (YAML flow mappings); returns its stdout."""
    corpus = tmp_path / "corpus"
    corpus.mkdir()
    lines = [f"the {w} sat on the {v} mat and the {v} cat ran.\n" for w in ("cat", "dog", "owl") for v in ("red", "big")]
    (corpus / "train.txt").write_text("".join(lines) * 12)
    (corpus / "valid.txt").write_text("".join(lines[::2]) * 2)
    recipe = tmp_path / "r.yaml"
    recipe.write_text(
        f"name: epochs\noutput_dir: {tmp_path / 'out'}\ncorpus: {corpus}\nvalidation: {{valid: prepared}}\n"
        "tokenizer: char\nseq_len: 16\neval_samples: 0\ndev_samples: 6\ncurve_points: 2\n"
        "convergence: {min_epochs: 2, min_improvement: 0.05}\n"
        "brillm_defaults: {hidden_size: 4, learning_rate: 0.05, batch_size: 4, lr_scheduler_type: cosine, warmup_steps: 2}\n"
        f"brillm:\n  - {brillm}\ngpt2: {gpt2}\n"
    )

    def study(*extra):
        result = subprocess.run([sys.executable, str(REPO_ROOT / "benchmarks" / "quality.py"), "--config", str(recipe),
                                 "--skip-kenlm", "--records", str(tmp_path / "records"), *extra],
                                capture_output=True, text=True, cwd=REPO_ROOT, timeout=600)  # fmt: skip
        assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
        return result.stdout

    return study


def test_a_token_budget_schedule_ends_where_the_run_stops():
    """A run by `train_tokens` stops at the first step whose real tokens reach the budget; its learning-rate
    schedule is exactly that many steps long, also when padded samples hold fewer than seq_len tokens."""
    import torch

    from modeling_brillm.train import batch_stream

    quality = _quality_module()
    lengths = torch.tensor([8, 3, 5, 8, 2, 7, 1, 8, 4, 6, 8])
    mask = (torch.arange(8) < lengths[:, None]).long()
    for budget in (1, 17, 40, int(lengths.sum()), 3 * int(lengths.sum()) + 5):
        steps = quality.steps_to_tokens(mask, 3, 0, budget)
        stream = batch_stream(len(mask), 3, 0)
        passed = [int(mask[next(stream)[2]].sum()) for _ in range(steps)]
        assert sum(passed[:-1]) < budget <= sum(passed), budget
    run = {**quality.BRILLM_KEYS, "train_tokens": 60, "batch_size": 3}
    train_set = {"input_ids": mask, "attention_mask": mask}
    stop, num_steps, _, _ = quality.training_limits(run, {"seed": 0}, train_set, None)
    assert num_steps == quality.steps_to_tokens(mask, 3, 0, 60) > math.ceil(60 / (3 * 8))  # padding: more steps
    assert stop(60, 0.0) and not stop(59, 0.0)


def test_epoch_runs_stop_by_the_convergence_rule_on_the_development_set(tmp_path):
    """Runs of `epochs` are evaluated at every epoch end and stop once the development samples (set aside from
    training) improve by less than min_improvement, from min_epochs on; GPT-2 follows the same rule."""
    study = _epoch_study(tmp_path, "{name: b, reference: true, curve: true, epochs: 8, converge: true}",
                         "{n_embd: 16, n_layer: 1, n_head: 1, learning_rate: 0.01, warmup_steps: 2, max_seconds: 0.1, "
                         "epochs: 3, converge: true}")  # fmt: skip
    study_log = study()
    results = json.loads((tmp_path / "out" / "results.json").read_text())
    rows = {row["name"]: row for row in results["rows"]}
    epochs_run = {}
    # A GPT-2 that stopped within the reference's wall-clock (0.1 s here) has no equal-wall-clock row; its last row
    # says whether the rule or the epoch cap stopped it.
    timed = "gpt2 (equal wall-clock)" in rows
    gpt2_converged = next(name for name, row in rows.items() if row["kind"] == "gpt2" and row.get("development"))
    stop = "to convergence" if rows[gpt2_converged]["development"]["converged_at"] else "3-epoch cap, not converged"
    assert gpt2_converged == (f"gpt2 ({stop})" if timed else f"gpt2 ({stop}, within the equal wall-clock)")
    for name, max_epochs in (("b", 8), (gpt2_converged, 3)):
        row = rows[name]
        epochs = [point["epoch"] for point in row["curve"] if "epoch" in point]
        bits, converged = row["development"]["bits_per_char"], row["development"]["converged_at"]
        # GPT-2's one run may train on past the rule's stop to reach the reference's tokens and wall-clock.
        stopped = row.get("epochs", len(epochs))
        assert epochs == list(range(1, len(epochs) + 1)) and len(bits) == stopped <= len(epochs)
        if converged is None:
            assert stopped == max_epochs and all(a - b >= 0.05 for a, b in zip(bits[1:-1], bits[2:]))
        else:
            assert converged == stopped >= 2 and bits[-2] - bits[-1] < 0.05
        at_stop = next(point for point in row["curve"] if point.get("epoch") == stopped)
        assert row["train_tokens"] == at_stop["tokens"] and row["metrics"]["valid"] == at_stop["metrics"]
        epochs_run[name] = len(epochs)
    assert rows["gpt2 (equal tokens)"]["train_tokens"] == rows["b"]["train_tokens"]
    assert rows["gpt2 (equal wall-clock)"]["seconds"] >= 0.1 if timed else rows[gpt2_converged]["seconds"] < 0.1
    from datasets import load_from_disk

    total = len(load_from_disk(str(tmp_path / "out" / "prepared" / "dataset"))["train"])
    seen = json.loads((tmp_path / "out" / "runs" / "b.json").read_text())["seen"]
    assert len(seen) == (total - 6) // 4 * 4 * epochs_run["b"]  # whole epochs of the training samples left
    assert len(set(seen)) <= total - 6  # the 6 development samples are not trained on
    # No saved progress is left once the records are written.
    assert "resuming" not in study_log and not list((tmp_path / "out" / "runs").glob("*.progress"))

    # The finished records saved in --records serve a study in a fresh output folder: nothing is trained again.
    again = study("--output-dir", str(tmp_path / "elsewhere"))
    assert "b: reusing its finished record" in again and "gpt2: reusing its finished record" in again
    assert json.loads((tmp_path / "elsewhere" / "results.json").read_text())["rows"] == results["rows"]


def test_a_gpt2_without_equal_tokens_stops_at_its_epoch_cap(tmp_path):
    """With `equal_tokens: false` a GPT-2 whose epoch cap ends before the reference's tokens stops there: no
    equal-tokens row, and its last row is its cap's epoch end."""
    study = _epoch_study(tmp_path, "{name: b, reference: true, epochs: 3}",
                         "{n_embd: 16, n_layer: 1, n_head: 1, learning_rate: 0.01, warmup_steps: 2, max_seconds: 0.01, "
                         "epochs: 1, converge: true, equal_tokens: false}")  # fmt: skip
    study()
    rows = {row["name"]: row for row in json.loads((tmp_path / "out" / "results.json").read_text())["rows"]}
    capped = rows["gpt2 (1-epoch cap, not converged)"]
    assert capped["epochs"] == 1 and len(capped["development"]["bits_per_char"]) == 1
    assert 3 * capped["train_tokens"] == rows["b"]["train_tokens"]  # the same batches: a third of the reference's
    assert [point["tokens"] for point in capped["curve"]][-1] == capped["train_tokens"]  # it trained no further
    assert "gpt2 (equal tokens)" not in rows


@pytest.mark.parametrize("every_seconds", [0.0, None])
def test_a_killed_run_resumes_from_its_saved_progress(tmp_path, monkeypatch, every_seconds):
    """A run killed mid-way (a session's end) goes on from its last save (every step here, or the last epoch end)
    and ends exactly as the run that was never stopped: same curve, same weights, same convergence history."""
    import torch

    import modeling_brillm.train as train
    from modeling_brillm import BriLLMConfig, BriLLMForCausalLM

    quality = _quality_module()
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(0, 12, (40, 8), generator=generator)
    mask = torch.ones_like(ids)
    train_set = {"input_ids": ids, "attention_mask": mask}
    valid = {"v": {"input_ids": ids[:8], "attention_mask": mask[:8], "num_chars": torch.full((8,), 9)}}
    settings = {"learning_rate": 0.05, "batch_size": 4, "lr_scheduler_type": "cosine", "warmup_steps": 2, "seed": 0}
    loss_fn = quality.brillm_loss({"objective": "full", "num_negatives": 0}, None)

    def run(progress=None):
        torch.manual_seed(1)
        model = BriLLMForCausalLM(BriLLMConfig(vocab_size=12, hidden_size=4))
        log = {"epochs": []}

        def epoch_check(done, model):
            log["epochs"].append(done)
            return done >= 3

        trained = quality.run_training("b", model, loss_fn, train_set, settings, valid, [50, 150], 8, "v",
                                       stop=lambda tokens, seconds: False, num_steps=30, epoch_check=epoch_check,
                                       progress=progress, carry={"log": log})  # fmt: skip
        return trained, model, log

    expected, expected_model, expected_log = run()
    progress = quality.RunProgress(tmp_path / "b.progress", key="k", every_seconds=every_seconds)
    real_step, calls = train.train_step, []

    def killed_at_17(*args, **kwargs):
        calls.append(1)
        if len(calls) == 17:
            raise KeyboardInterrupt
        return real_step(*args, **kwargs)

    monkeypatch.setattr(train, "train_step", killed_at_17)
    with pytest.raises(KeyboardInterrupt):
        run(progress)
    monkeypatch.setattr(train, "train_step", real_step)
    assert json.loads((tmp_path / "b.progress" / "progress.json").read_text())["steps"] == (16 if every_seconds == 0 else 10)
    resumed, model, log = run(progress)
    assert resumed["resumed"] == 1 and expected["resumed"] == 0
    def untimed(points):  # the clock differs, nothing else
        return [{k: v for k, v in point.items() if k != "seconds"} for point in points]

    assert untimed(resumed["curve"]) == untimed(expected["curve"])
    assert untimed(resumed["at_tokens"].values()) == untimed(expected["at_tokens"].values())
    for key in ("tokens", "steps", "seen", "final_loss"):
        assert resumed[key] == expected[key], key
    assert log == expected_log == {"epochs": [1, 2, 3]}
    for (name, a), b in zip(model.named_parameters(), expected_model.parameters()):
        assert torch.equal(a, b), name
    # A progress saved under other settings is not resumed (and is removed).
    assert quality.RunProgress(tmp_path / "b.progress", key="other", every_seconds=None).load(model, None, None) is None
    assert not (tmp_path / "b.progress").exists()
