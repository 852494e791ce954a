"""What a long run needs: learning-rate schedules, epochs, held-out bits/char at every epoch end, the n-gram
baseline beside BriLLM's number, and generated text without broken characters."""

import json
import math

import pytest
import torch
from datasets import load_from_disk
from huggingface_hub import ModelCard

from modeling_brillm.data import sample_tensors
from modeling_brillm.ngram import KneserNeyLM
from modeling_brillm.preparation import prepare
from modeling_brillm.tokenization_brillm import WholeCharacters, train_bpe_tokenizer
from modeling_brillm.train import (
    DataRecipe,
    Recipe,
    TrainRecipe,
    build_optimizer,
    build_scheduler,
    check_resume,
    latest_checkpoint,
    total_steps,
    train,
)

TEXT = (
    "It is a truth universally acknowledged, that a single man in possession of a good fortune, must be in want "
    "of a wife. However little known the feelings or views of such a man may be on his first entering a "
    "neighbourhood, this truth is so well fixed in the minds of the surrounding families.\n"
)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    folder = tmp_path_factory.mktemp("long")
    (folder / "a.txt").write_text(TEXT * 30)
    prepare([folder / "a.txt"], folder / "prepared", tokenizer="char", seq_len=16, hidden_size=4, log=None)
    return folder / "prepared"


def recipe_for(prepared, output_dir, **train_settings):
    settings = {"learning_rate": 0.05, "batch_size": 4, "save_steps": 1000, "eval_steps": 1000, "log_steps": 1,
                "seed": 1, **train_settings}  # fmt: skip
    return Recipe("long", DataRecipe(prepared=str(prepared)), TrainRecipe(**settings), output_dir=str(output_dir))


def test_epochs_linear_decay_and_an_evaluation_at_every_epoch_end(prepared, tmp_path, capsys):
    samples = len(load_from_disk(str(prepared / "dataset"))["train"])
    per_epoch = samples // 4
    metrics = train(recipe_for(prepared, tmp_path / "out", num_epochs=2, lr_scheduler_type="linear", warmup_steps=3))
    out = capsys.readouterr().out
    state = json.loads((latest_checkpoint(tmp_path / "out") / "trainer_state.json").read_text())
    assert state["step"] == 2 * per_epoch
    epochs = [entry for entry in state["log_history"] if "epoch" in entry]
    assert [(e["epoch"], e["step"]) for e in epochs] == [(1, per_epoch), (2, 2 * per_epoch)]
    assert f"epoch 2 (step {2 * per_epoch}) eval" in out
    # The epoch-end evaluation covers the whole validation split, the final report the same tokens.
    assert epochs[-1]["eval_bits_per_char"] == pytest.approx(metrics["bits_per_char"], abs=1e-4)
    rates = [entry["learning_rate"] for entry in state["log_history"] if "learning_rate" in entry]
    assert rates[0] == pytest.approx(0.05 / 3)  # warm-up: step 1 of 3
    assert rates[2] == pytest.approx(0.05)
    assert all(a >= b for a, b in zip(rates[2:], rates[3:])) and rates[-1] == pytest.approx(0.0, abs=1e-12)
    card = ModelCard.load(tmp_path / "out" / "README.md").text
    assert "held-out bits/char after epoch 2" in card and "2 epochs" in card and "linear" in card


def test_bits_per_char_divide_by_the_characters_the_samples_record(prepared, tmp_path):
    metrics = train(recipe_for(prepared, tmp_path / "out", max_steps=2, baseline_order=0))
    valid = load_from_disk(str(prepared / "dataset"))["validation"]
    assert metrics["characters"] == sum(valid["num_chars"])
    assert "kneser_ney_5gram" not in json.loads((tmp_path / "out" / "eval_results.json").read_text())


def test_the_kneser_ney_baseline_is_scored_on_the_same_held_out_tokens(prepared, tmp_path, capsys):
    metrics = train(recipe_for(prepared, tmp_path / "out", max_steps=2, baseline_order=3))
    assert "baseline: a Kneser-Ney 3-gram on the same training samples" in capsys.readouterr().out
    baseline = json.loads((tmp_path / "out" / "eval_results.json").read_text())["kneser_ney_3gram"]
    assert (baseline["tokens"], baseline["characters"]) == (metrics["tokens"], metrics["characters"])
    dataset = load_from_disk(str(prepared / "dataset"))
    train_set, valid_set = sample_tensors(dataset["train"]), sample_tensors(dataset["validation"])
    vocab_size = json.loads((prepared / "model" / "config.json").read_text())["vocab_size"]
    lm = KneserNeyLM.fit(train_set["input_ids"], train_set["attention_mask"], vocab_size, 3)
    nll = lm.score(valid_set["input_ids"], valid_set["attention_mask"])["nll"]
    assert baseline["bits_per_char"] == pytest.approx(nll / math.log(2) / float(valid_set["num_chars"].sum()), abs=1e-4)
    card = ModelCard.load(tmp_path / "out" / "README.md").text
    assert "Kneser-Ney 3-gram on the same samples" in card


def test_run_length_and_schedule_settings_are_checked():
    assert total_steps(TrainRecipe(num_epochs=1.5), batches_per_epoch=10) == 15
    assert total_steps(TrainRecipe(max_steps=7), batches_per_epoch=10) == 7
    bad = [
        ({"max_steps": 5, "num_epochs": 1}, "not both"),
        ({"num_epochs": 0}, "num_epochs must be positive"),
        ({"lr_scheduler_type": "cosine_annealing"}, "lr_scheduler_type must be one of"),
        ({"warmup_steps": 10}, "constant has no warm-up"),
        ({"baseline_order": 1}, "baseline_order must be 0"),
    ]
    for settings, message in bad:
        with pytest.raises(ValueError, match=message):
            Recipe("r", DataRecipe(), TrainRecipe(**settings)).check()


def test_the_scheduler_counts_optimizer_steps_across_processes():
    # Accelerate's prepared scheduler advances once per process at every optimizer step.
    settings = TrainRecipe(learning_rate=1.0, lr_scheduler_type="linear", warmup_steps=2)
    optimizer = build_optimizer(torch.nn.Linear(1, 1), settings)
    scheduler = build_scheduler(optimizer, settings, num_steps=10, num_processes=4)
    optimizer.step()
    for _ in range(4):  # one optimizer step of 4 processes
        scheduler.step()
    assert scheduler.get_last_lr()[0] == pytest.approx(0.5)  # step 1 of the 2 warm-up steps


def test_resume_may_change_the_length_only_under_a_length_free_schedule(prepared, tmp_path):
    for schedule, allowed in (("constant_with_warmup", True), ("cosine", False)):
        out = tmp_path / schedule
        train(recipe_for(prepared, out, max_steps=2, save_steps=2, lr_scheduler_type=schedule, warmup_steps=1,
                         baseline_order=0))  # fmt: skip
        longer = recipe_for(prepared, out, max_steps=4, lr_scheduler_type=schedule, warmup_steps=1, baseline_order=0)
        if allowed:
            check_resume(longer, latest_checkpoint(out), num_processes=1)
        else:
            with pytest.raises(ValueError, match="cosine learning-rate schedule depends on the run's length"):
                check_resume(longer, latest_checkpoint(out), num_processes=1)


def test_checkpoints_of_older_recipes_resume(prepared, tmp_path):
    """A checkpoint written before schedules and epochs existed records neither: they mean the defaults."""
    out = tmp_path / "out"
    train(recipe_for(prepared, out, max_steps=2, save_steps=2, baseline_order=0))
    recorded = latest_checkpoint(out) / "recipe.json"
    state = json.loads(recorded.read_text())
    for key in ("lr_scheduler_type", "warmup_steps", "num_epochs", "baseline_order"):
        del state["train"][key]
    state["train"]["max_steps"] = 1000  # the old default, written out
    recorded.write_text(json.dumps(state))
    check_resume(recipe_for(prepared, out, max_steps=4, baseline_order=5), latest_checkpoint(out), num_processes=1)


MULTI_BYTE = "café crème brûlée, naïve façade — déjà vu; Ærø, smörgåsbord, jalapeño, 東京 ok\n"


def test_whole_characters_keeps_sampled_bpe_text_valid_utf8(tmp_path):
    from modeling_brillm import BriLLMConfig, BriLLMForCausalLM

    tokenizer = train_bpe_tokenizer([MULTI_BYTE] * 20, vocab_size=280)
    V = len(tokenizer)
    torch.manual_seed(0)
    model = BriLLMForCausalLM(BriLLMConfig(vocab_size=V, hidden_size=4, num_slots=1)).eval()  # every edge shared
    prompt = tokenizer("caf", return_tensors="pt", add_special_tokens=False).input_ids
    length = prompt.shape[1] + 60

    def sample(processors):
        torch.manual_seed(3)
        out = model.generate(prompt, max_length=length, do_sample=True, temperature=50.0, logits_processor=processors)
        return tokenizer.decode(out[0], skip_special_tokens=True), out[0]

    broken, _ = sample([])
    assert "\ufffd" in broken  # without it, sampling this untrained model breaks characters
    keep = WholeCharacters.for_tokenizer(tokenizer, max_length=length)
    text, ids = sample([keep])
    assert "\ufffd" not in text and len(ids) == length
    data = b"".join(keep.token_bytes[i] or b"" for i in ids.tolist())
    data.decode("utf-8")  # strictly valid, and nothing left unfinished at the end
