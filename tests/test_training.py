"""Pre-training with Accelerate: checkpoints, exact resume after a kill, 2 processes on CPU, NaN stop, Trainer."""

import json
import math
import os
import signal
import subprocess
import sys
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file

from modeling_brillm import BriLLMConfig, BriLLMForCausalLM
from modeling_brillm.tokenization_brillm import character_tokenizer
from modeling_brillm.train import Recipe, epoch_batches, latest_checkpoint, sampled_candidates, top_successors

REPO = Path(__file__).resolve().parent.parent
TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, "
    "must be in want of a wife. However little known the feelings or views of such a man may be "
) * 8


def make_prepared(folder, seq_len=12, hidden_size=4):
    """A hand-made `brillm prepare` folder: character tokenizer, bigram graph, model, packed dataset."""
    from datasets import Dataset, DatasetDict

    chars = sorted(set(TEXT))
    vocab = {"<unk>": 0, **{c: i + 1 for i, c in enumerate(chars)}}
    tokenizer = character_tokenizer(vocab)
    ids = tokenizer(TEXT, add_special_tokens=False).input_ids
    V = len(vocab)
    pairs = torch.tensor(ids[:-1]) * V + torch.tensor(ids[1:])
    owned = torch.bincount(pairs, minlength=V * V).view(V, V) > 0
    row_ptr = torch.cat([torch.zeros(1, dtype=torch.long), owned.sum(1).cumsum(0)])
    col_idx = owned.nonzero()[:, 1].int()
    config = BriLLMConfig(vocab_size=V, hidden_size=hidden_size, num_slots=1 + len(col_idx), unk_token_id=0)
    torch.manual_seed(0)
    BriLLMForCausalLM.from_graph(config, row_ptr, col_idx).save_pretrained(folder / "model")
    tokenizer.save_pretrained(folder / "tokenizer")
    windows = [ids[i : i + seq_len] for i in range(0, len(ids) - seq_len + 1, seq_len)]
    split = len(windows) - 4
    DatasetDict({
        "train": Dataset.from_dict({"input_ids": windows[:split]}),
        "validation": Dataset.from_dict({"input_ids": windows[split:]}),
    }).save_to_disk(str(folder / "dataset"))  # fmt: skip
    return folder


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("prepared"))


def write_recipe(path, prepared, output_dir, **train):
    settings = {"learning_rate": 0.05, "batch_size": 4, "max_steps": 12, "save_steps": 4, "eval_steps": 6,
                "log_steps": 2, "max_eval_batches": 2, "seed": 3, **train}
    path.write_text(json.dumps({"name": "test", "output_dir": str(output_dir),
                                "data": {"prepared": str(prepared)}, "train": settings}))
    return path


def run_train(recipe, *args, env=None, **kwargs):
    command = [sys.executable, "-m", "modeling_brillm.train", "--config", str(recipe), *args]
    environment = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1", **(env or {})}
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=environment, timeout=600, **kwargs)


def final_weights(output_dir):
    return load_file(Path(output_dir) / "model.safetensors")


def test_epoch_batches_are_disjoint_across_processes_and_epochs_differ():
    ranks = [sum(epoch_batches(50, 4, epoch=1, seed=7, rank=r, world_size=3), []) for r in range(3)]
    assert all(len(r) == 16 for r in ranks)
    assert len(set(ranks[0]) | set(ranks[1]) | set(ranks[2])) == 48
    assert epoch_batches(50, 4, 0, 7, 0, 3) != epoch_batches(50, 4, 1, 7, 0, 3)
    assert epoch_batches(50, 4, 1, 7, 0, 3) == epoch_batches(50, 4, 1, 7, 0, 3)


def test_sampled_candidates_follow_the_reference_rule():
    train_ids = torch.tensor([[1, 2, 1, 3, 1, 2, 1, 2, 1, 4]])
    successors = top_successors(train_ids, vocab_size=5, k=3)
    assert successors[1].tolist() == [2, 3, 4]  # 1->2 three times, then 1->3, 1->4 once each
    candidates = sampled_candidates(torch.tensor([[1, 3, 1, 2]]), successors, num_negatives=2)
    # edge 1->3: true target first, then the two most frequent other successors of 1
    assert candidates[0, 0].tolist() == [3, 2, 4]
    assert candidates[0, 2].tolist() == [2, 3, 4]


def test_recipes_in_the_repo_parse_and_typos_are_refused(tmp_path):
    for path in (REPO / "configuration" / "train").glob("*.yaml"):
        Recipe.from_yaml(path)
    bad = tmp_path / "bad.yaml"
    bad.write_text("train:\n  learning_rte: 0.1\n")
    with pytest.raises(ValueError, match="learning_rte"):
        Recipe.from_yaml(bad)


def test_training_saves_checkpoints_and_a_loadable_model(prepared, tmp_path):
    recipe = write_recipe(tmp_path / "r.json", prepared, tmp_path / "out")
    result = run_train(recipe)
    assert result.returncode == 0, result.stderr[-3000:]
    assert "step 12 loss" in result.stdout and "held-out perplexity" in result.stdout
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-12", "checkpoint-4", "checkpoint-8"]
    assert not list(out.glob(".tmp-*"))
    state = json.loads((out / "checkpoint-12" / "trainer_state.json").read_text())
    losses = [entry["loss"] for entry in state["log_history"] if "loss" in entry]
    assert losses[-1] < losses[0]  # it learns
    assert any("eval_bits_per_char" in entry for entry in state["log_history"])
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(out, trust_remote_code=True)
    assert torch.equal(model.model.weights, final_weights(out)["model.weights"])
    assert json.loads((out / "eval_results.json").read_text())["bits_per_char"] > 0


def test_resume_after_a_kill_ends_with_the_same_weights(prepared, tmp_path):
    reference = write_recipe(tmp_path / "a.json", prepared, tmp_path / "straight", max_steps=16)
    assert run_train(reference).returncode == 0
    recipe = write_recipe(tmp_path / "b.json", prepared, tmp_path / "killed", max_steps=16)
    command = [sys.executable, "-m", "modeling_brillm.train", "--config", str(recipe)]
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    process = subprocess.Popen(command, cwd=REPO, env=env, stdout=subprocess.DEVNULL, stderr=subprocess.DEVNULL)
    deadline = time.time() + 300
    while latest_checkpoint(tmp_path / "killed") is None or latest_checkpoint(tmp_path / "killed").name == "checkpoint-4":
        assert process.poll() is None, "training ended before it could be interrupted"
        assert time.time() < deadline
        time.sleep(0.05)
    process.send_signal(signal.SIGKILL)
    process.wait()
    interrupted_at = latest_checkpoint(tmp_path / "killed")
    assert not (tmp_path / "killed" / "model.safetensors").exists()  # it really died before the end
    result = run_train(recipe, "--resume")
    assert result.returncode == 0, result.stderr[-3000:]
    assert f"resumed from {interrupted_at}" in result.stdout
    straight, resumed = final_weights(tmp_path / "straight"), final_weights(tmp_path / "killed")
    assert straight.keys() == resumed.keys()
    for name in straight:
        assert torch.equal(straight[name], resumed[name]), name


def test_a_half_written_checkpoint_is_never_resumed(prepared, tmp_path):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.json", prepared, out, max_steps=4)
    assert run_train(recipe).returncode == 0
    (out / ".tmp-checkpoint-8-123").mkdir()  # what a kill during saving leaves behind
    (out / "checkpoint-9").mkdir()  # no trainer state: incomplete
    assert latest_checkpoint(out).name == "checkpoint-4"


def test_nan_loss_stops_with_a_clear_message(prepared, tmp_path):
    recipe = write_recipe(tmp_path / "r.json", prepared, tmp_path / "out", learning_rate=1e30, max_steps=12)
    result = run_train(recipe)
    assert result.returncode != 0
    assert "training stopped; the last good checkpoint" in result.stderr


def test_sampled_objective_trains(prepared, tmp_path):
    recipe = write_recipe(tmp_path / "r.json", prepared, tmp_path / "out", objective="sampled", num_negatives=5, max_steps=4)
    result = run_train(recipe)
    assert result.returncode == 0, result.stderr[-3000:]


def test_two_cpu_processes_see_disjoint_data_and_agree(prepared, tmp_path):
    recipe = write_recipe(tmp_path / "r.json", prepared, tmp_path / "out", max_steps=4, save_steps=2, eval_steps=4)
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file",
        str(REPO / "configuration" / "accelerate" / "cpu-2proc.yaml"), "--main_process_port", "0",
        "-m", "modeling_brillm.train", "--config", str(recipe), "--debug-dir", str(tmp_path / "debug"),
    ]  # fmt: skip
    env = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
           "HF_HOME": str(tmp_path / "hf")}
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads((tmp_path / "debug" / f"rank{r}.json").read_text()) for r in range(2)]
    assert all(r["num_processes"] == 2 and "MULTI_CPU" in r["distributed_type"] for r in records)
    assert not set(records[0]["samples"]) & set(records[1]["samples"])
    assert len(records[0]["samples"]) == len(records[1]["samples"]) == 4 * 4
    assert records[0]["weights_checksum"] == records[1]["weights_checksum"]
    assert result.stdout.count("step 4 loss") == 1  # only the main process reports
    out = tmp_path / "out"
    assert sorted(p.name for p in out.glob("checkpoint-*")) == ["checkpoint-2", "checkpoint-4"]
    assert not list(out.glob(".tmp-*"))


def test_trainer_gradient_accumulation_matches_the_larger_batch(prepared, tmp_path):
    from datasets import load_from_disk
    from transformers import AutoTokenizer, DataCollatorForLanguageModeling, Trainer, TrainingArguments

    tokenizer = AutoTokenizer.from_pretrained(prepared / "tokenizer")
    tokenizer.pad_token = tokenizer.unk_token
    dataset = load_from_disk(str(prepared / "dataset"))["train"].select(range(8))
    results = []
    for batch, accumulation in ((4, 1), (2, 2), (1, 4)):
        model = BriLLMForCausalLM.from_pretrained(prepared / "model")
        args = TrainingArguments(
            output_dir=str(tmp_path / f"t{batch}"), per_device_train_batch_size=batch,
            gradient_accumulation_steps=accumulation, max_steps=2, learning_rate=1e-2, logging_steps=1,
            report_to=[], use_cpu=True, save_strategy="no", seed=0, data_seed=0, optim="adamw_torch",
        )  # fmt: skip
        trainer = Trainer(model=model, args=args, train_dataset=dataset,
                          data_collator=DataCollatorForLanguageModeling(tokenizer, mlm=False))
        trainer.train()
        logs = [entry for entry in trainer.state.log_history if "loss" in entry]
        results.append(([entry["loss"] for entry in logs], [entry["grad_norm"] for entry in logs]))
    for losses, norms in results[1:]:
        assert losses == pytest.approx(results[0][0], rel=1e-4)
        assert norms == pytest.approx(results[0][1], rel=1e-4)


def test_recipe_numbers_written_without_a_dot_are_numbers(tmp_path):
    path = tmp_path / "r.yaml"
    path.write_text("train:\n  learning_rate: 5e-2\n  max_steps: 10\n")
    assert Recipe.from_yaml(path).train.learning_rate == 0.05
    path.write_text("train:\n  learning_rate: fast\n")
    with pytest.raises(ValueError, match="learning_rate must be a float"):
        Recipe.from_yaml(path)


def test_eval_of_a_uniform_model_gives_log2_vocab_bits_per_token(prepared, tmp_path):
    model = BriLLMForCausalLM.from_pretrained(prepared / "model")
    with torch.no_grad():  # every edge lets the same energy through: a uniform next-token distribution
        model.model.weights.zero_()
        model.model.biases.zero_()
    model.save_pretrained(tmp_path / "uniform")
    from transformers import AutoTokenizer

    AutoTokenizer.from_pretrained(prepared / "tokenizer").save_pretrained(tmp_path / "uniform")
    text = "a single man in possession of a good fortune"
    (tmp_path / "valid.txt").write_text(text)
    result = subprocess.run(
        [sys.executable, "-m", "modeling_brillm.cli", "eval", str(tmp_path / "uniform"), "--data",
         str(tmp_path / "valid.txt"), "--seq-len", "8"],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    report = json.loads(result.stdout.strip().splitlines()[-1])
    V = model.config.vocab_size
    windows = [len(text[i : i + 8]) for i in range(0, len(text), 8)]
    predicted = sum(n - 1 for n in windows if n >= 2)
    assert report["tokens"] == predicted == report["characters"]  # one character per token
    assert report["perplexity"] == pytest.approx(V, rel=1e-4)
    assert report["bits_per_char"] == pytest.approx(math.log2(V), rel=1e-4)


def test_the_trained_model_has_a_card_with_its_recipe_and_scores(prepared, tmp_path):
    from huggingface_hub import ModelCard

    recipe = write_recipe(tmp_path / "r.json", prepared, tmp_path / "out", max_steps=2, save_steps=2, eval_steps=2)
    assert run_train(recipe).returncode == 0
    card = ModelCard.load(tmp_path / "out" / "README.md")
    assert "brillm train" in card.text and "held-out bits_per_char" in card.text
    assert card.data.library_name == "transformers" and "brillm" in card.data.tags
