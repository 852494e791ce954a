"""The interpretation API on the reference fixture: traces agree with the model, the graph and the positions."""

import builtins
import json
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import PreTrainedTokenizerFast

from modeling_brillm import BriLLMForCausalLM
from modeling_brillm.interpretation import edge_report, plot_trace, positional_weights, trace_signal

FIXTURE = Path(__file__).parent / "fixtures" / "official-tiny"
REPO = Path(__file__).resolve().parent.parent


@pytest.fixture(scope="module")
def fixture():
    return json.loads((FIXTURE / "fixture.json").read_text())


@pytest.fixture(scope="module")
def tokenizer():
    """Whole-token tokenizer over the fixture vocabulary: text is the tokens separated by spaces."""
    vocab = json.loads((FIXTURE / "vocab.json").read_text())
    tok = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    tok.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    return PreTrainedTokenizerFast(tokenizer_object=tok, unk_token="[UNK]", pad_token="[PAD]")


@pytest.fixture(scope="module")
def model(converted_fixture):
    model = BriLLMForCausalLM.from_pretrained(converted_fixture).eval()
    with torch.no_grad():  # non-uniform positional logits, so the weights are worth checking
        model.model.positions.copy_(torch.linspace(-1, 1, 512).view(1, 512, 1))
    return model


def texts(fixture):
    return [" ".join(tokens) for tokens in fixture["inputs"]["tokens"]]


def test_trace_probabilities_are_the_models_softmaxed_logits(model, tokenizer, fixture):
    traces = trace_signal(model, tokenizer, texts(fixture), top_k=64)
    ids = torch.tensor(fixture["inputs"]["token_ids"])
    with torch.no_grad():
        probabilities = torch.softmax(model(ids).logits, dim=-1)
    for row, trace in enumerate(traces):
        assert trace.token_ids == ids[row].tolist()
        for step in trace.steps:
            got = torch.zeros(64)
            for candidate in step.candidates:
                got[candidate.token_id] = candidate.probability
            assert torch.allclose(got, probabilities[row, step.position], atol=1e-6)
            energies = [c.energy for c in step.candidates]
            assert energies == sorted(energies, reverse=True)
            if step.next_id is not None:
                target = ids[row, step.position + 1]
                assert step.next_probability == pytest.approx(float(probabilities[row, step.position, target]), abs=1e-6)
                assert step.next_rank == 1 + int((probabilities[row, step.position] > probabilities[row, step.position, target]).sum())
        assert trace.steps[-1].next_id is None  # the last step predicts beyond the text


def test_positional_weights_sum_to_one_and_follow_the_positions(model, tokenizer, fixture):
    trace = trace_signal(model, tokenizer, texts(fixture)[0])
    assert trace.steps[0].positional_weights == []  # the start signal mixes no earlier energy
    learned = model.model.positions.view(-1)
    for step in trace.steps[1:]:
        weights = torch.tensor(step.positional_weights)
        assert len(weights) == step.position
        assert float(weights.sum()) == pytest.approx(1.0, abs=1e-6)
        assert torch.allclose(weights, torch.softmax(learned[: step.position], 0), atol=1e-6)
    # past the learned positions the last logit is reused, as in the model
    long = positional_weights(model, 600)
    assert torch.allclose(long[511:], long[-1].expand(89))


def test_owned_flags_agree_with_the_slot_map(model, tokenizer, fixture):
    slot_matrix = torch.tensor(fixture["slot_matrix"])
    for trace in trace_signal(model, tokenizer, texts(fixture), top_k=64):
        for step in trace.steps:
            for candidate in step.candidates:
                assert candidate.owned == bool(slot_matrix[step.source_id, candidate.token_id] > 0)


def test_edge_report(model, tokenizer, fixture):
    slot_matrix = torch.tensor(fixture["slot_matrix"])
    report = edge_report(model, tokenizer, "Ġlegs", top_k=64)
    source = report["source_id"]
    assert report["owned_edges"] == int((slot_matrix[source] > 0).sum())
    with torch.no_grad():
        logits = model(torch.tensor([[source]])).logits[0, 0]
    shared = slot_matrix[source] == 0
    assert report["shared_energy"] == pytest.approx(float(logits[shared][0]))
    assert sum(c.owned for c in report["edges"]) == report["owned_edges"]
    with pytest.raises(ValueError, match="not a node"):
        edge_report(model, tokenizer, 64)


def test_plots_write_a_png(model, tokenizer, fixture, tmp_path):
    trace = trace_signal(model, tokenizer, texts(fixture)[2])
    path = plot_trace(model, trace, tmp_path / "trace.png")
    assert Path(path).read_bytes()[:8] == b"\x89PNG\r\n\x1a\n"


def test_plots_keep_the_users_matplotlib_backend():
    # A library never switches the backend: in Jupyter that would hide every inline plot.
    script = (
        "import matplotlib; matplotlib.use('svg')\n"
        "from modeling_brillm import BriLLMConfig, BriLLMForCausalLM\n"
        "from modeling_brillm.interpretation import plot_out_degrees, plot_positional_weights\n"
        "model = BriLLMForCausalLM(BriLLMConfig(vocab_size=8, hidden_size=4))\n"
        "plot_out_degrees(model); plot_positional_weights(model, num_edges=4)\n"
        "print(matplotlib.get_backend())\n"
    )
    result = subprocess.run([sys.executable, "-c", script], capture_output=True, text=True, cwd=REPO, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    assert result.stdout.split()[-1] == "svg"


def test_plots_explain_a_missing_matplotlib(model, tokenizer, fixture, tmp_path, monkeypatch):
    real_import = builtins.__import__

    def no_matplotlib(name, *args, **kwargs):
        if name.startswith("matplotlib"):
            raise ImportError(name)
        return real_import(name, *args, **kwargs)

    monkeypatch.setattr(builtins, "__import__", no_matplotlib)
    trace = trace_signal(model, tokenizer, texts(fixture)[0])
    with pytest.raises(ImportError, match="pip install matplotlib"):
        plot_trace(model, trace, tmp_path / "x.png")


def test_trace_cli(converted_fixture, tokenizer, tmp_path):
    folder = tmp_path / "model"
    shutil.copytree(converted_fixture, folder)
    tokenizer.save_pretrained(folder)
    result = subprocess.run(
        [sys.executable, "-m", "modeling_brillm.cli", "trace", str(folder), "--text", "l Ġlegs Ġlegs Ġwith",
         "--out", str(tmp_path / "t.png")],
        capture_output=True, text=True, cwd=REPO, timeout=300,
    )  # fmt: skip
    assert result.returncode == 0, result.stderr[-2000:]
    assert "rank" in result.stdout and (tmp_path / "t.png").is_file()
