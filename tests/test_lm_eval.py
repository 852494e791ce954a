"""EleutherAI's lm-evaluation-harness (the `brillm[eval]` extra) runs on the folders we write, offline.

The README's command on local tasks: a rolling log-likelihood (perplexity) task, a multiple-choice task and a
generation task. Its log-likelihoods must equal the model's own on the same windows: documents are cut into
windows of the advertised context length (``context_length``, 32 tokens), the first one after the boundary
token.
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import lm_eval.utils as lm_eval_utils  # the `eval` extra: pip install -e '.[eval]'
import pytest
import torch
from tokenizers import Tokenizer, models, pre_tokenizers
from transformers import AutoTokenizer

from modeling_brillm import BriLLMForCausalLM
from modeling_brillm.preparation import prepare


REPO = Path(__file__).resolve().parent.parent
CORPUS = "the cat sat on the mat and the dog sat on the log by the door.\n" * 30


def english_texts():
    """Documents, multiple-choice rows and prompts for a model trained on `CORPUS` (a character vocabulary)."""
    docs = ["the cat sat on the mat and the dog sat on the log by the door. the cat sat on the mat. the dog sat.",
            "the dog sat by the door."]  # fmt: skip
    choices = [
        {"context": "the cat sat on the", "choices": [" mat", " log", " door"], "label": 0},
        {"context": "the dog sat by", "choices": [" the door", " the cat"], "label": 0},
    ]
    return docs, choices, ["the cat sat", "the dog"]


def word_texts(vocab):
    """The same for a whole-word vocabulary: texts made of its tokens separated by spaces."""
    words = [token for token in vocab if not token.startswith("[")]
    docs = [" ".join((words * 3)[:80]), " ".join(words[:9])]
    choices = [{"context": " ".join(words[:4]), "choices": [" " + words[4], " " + " ".join(words[7:9])], "label": 1}]
    return docs, choices, [" ".join(words[2:5])]


def write_tasks(folder, docs, choices, prompts):
    """Three local tasks over small JSON files (the README's `--include_path` layout)."""
    folder.mkdir()

    def lines(name, rows):
        (folder / name).write_text("".join(json.dumps(row) + "\n" for row in rows))
        return folder / name

    def task(name, data, body):
        head = f"task: {name}\ndataset_path: json\ndataset_kwargs:\n  data_files:\n    test: {data}\ntest_split: test\n"
        (folder / f"{name}.yaml").write_text(head + body)

    task("brillm_rolling", lines("docs.jsonl", [{"text": text} for text in docs]),
         'output_type: loglikelihood_rolling\ndoc_to_text: ""\ndoc_to_target: "{{text}}"\n'
         "metric_list:\n  - metric: word_perplexity\n")  # fmt: skip
    task("brillm_choice", lines("choices.jsonl", choices),
         'output_type: multiple_choice\ndoc_to_text: "{{context}}"\ndoc_to_choice: "{{choices}}"\n'
         'doc_to_target: label\ntarget_delimiter: ""\nmetric_list:\n  - metric: acc\n')  # fmt: skip
    task("brillm_generate", lines("prompts.jsonl", [{"prompt": p, "answer": "x"} for p in prompts]),
         'output_type: generate_until\ndoc_to_text: "{{prompt}}"\ndoc_to_target: "{{answer}}"\n'
         "generation_kwargs:\n  until: [\"\\n\"]\n  max_gen_toks: 6\n  do_sample: false\n"
         "metric_list:\n  - metric: exact_match\n")  # fmt: skip
    return folder


def run_lm_eval(model_dir, tasks, output):
    """The README's command, offline; returns ``{task: [sample, ...]}`` from ``--log_samples``."""
    command = [
        sys.executable, "-m", "lm_eval", "--model", "hf",
        "--model_args", f"pretrained={model_dir},trust_remote_code=True", "--device", "cpu",
        "--tasks", "brillm_rolling,brillm_choice,brillm_generate", "--include_path", str(tasks),
        "--output_path", str(output), "--log_samples",
    ]  # fmt: skip
    env = {**os.environ, "HF_DATASETS_OFFLINE": "1", "HF_HUB_OFFLINE": "1", "TOKENIZERS_PARALLELISM": "false"}
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=output.parent, timeout=600)
    assert result.returncode == 0, result.stdout[-3000:] + result.stderr[-3000:]
    samples = {}
    for path in output.rglob("samples_*.jsonl"):
        task = path.name[len("samples_") :].rsplit("_", 1)[0]
        samples[task] = [json.loads(line) for line in path.read_text().splitlines()]
    return samples


def continuation_loglikelihood(model, context, continuation):
    """Our log-likelihood of the token list ``continuation`` after the token list ``context``."""
    ids = torch.tensor([context + continuation])
    with torch.no_grad():
        logprobs = model(ids[:, :-1]).logits.log_softmax(-1)[0, len(context) - 1 :]  # (len(continuation), V)
    return logprobs.gather(-1, torch.tensor(continuation)[:, None]).sum().item()


def check_against_ours(model_dir, samples):
    model = BriLLMForCausalLM.from_pretrained(model_dir).eval()
    tokenizer = AutoTokenizer.from_pretrained(model_dir)
    length = model.config.context_length
    assert tokenizer.model_max_length == length == 32 and model.config.n_positions == length
    encode = lambda text: tokenizer(text, add_special_tokens=False)["input_ids"]  # noqa: E731

    rolling = sorted(samples["brillm_rolling"], key=lambda s: s["doc_id"])
    assert len(encode(rolling[0]["doc"]["text"])) > 2 * length  # several windows
    ours = 0.0
    for sample in rolling:
        windows = lm_eval_utils.get_rolling_token_windows(
            encode(sample["doc"]["text"]), prefix_token=tokenizer.bos_token_id, max_seq_len=length, context_len=1
        )
        ours += sum(continuation_loglikelihood(model, *lm_eval_utils.make_disjoint_window(w)) for w in windows)
    theirs = sum(float(sample["filtered_resps"][0]) for sample in rolling)
    assert theirs == pytest.approx(ours, rel=1e-5, abs=1e-3)

    ours = theirs = 0.0
    for sample in samples["brillm_choice"]:
        context = encode(sample["doc"]["context"])
        for choice, response in zip(sample["doc"]["choices"], sample["filtered_resps"]):
            ours += continuation_loglikelihood(model, context, encode(choice))
            theirs += float(response[0])
    assert theirs == pytest.approx(ours, rel=1e-5, abs=1e-3)

    for sample in samples["brillm_generate"]:  # greedy, up to max_gen_toks, the boundary token or a newline
        ids = torch.tensor([encode(sample["doc"]["prompt"])])
        greedy = model.generate(ids, max_new_tokens=6, do_sample=False)[0, ids.shape[1] :].tolist()
        greedy = greedy[: greedy.index(tokenizer.eos_token_id)] if tokenizer.eos_token_id in greedy else greedy
        assert sample["filtered_resps"][0] == tokenizer.decode(greedy, skip_special_tokens=True).split("\n")[0]


def test_lm_eval_on_a_trained_folder(tmp_path):
    (tmp_path / "corpus.txt").write_text(CORPUS)
    prepare([tmp_path / "corpus.txt"], tmp_path / "prepared", hidden_size=4, log=None)
    recipe = {"name": "lm-eval", "output_dir": str(tmp_path / "trained"), "data": {"prepared": str(tmp_path / "prepared")},
              "train": {"learning_rate": 0.05, "batch_size": 4, "max_steps": 4, "save_steps": 4, "eval_steps": 4,
                        "max_eval_batches": 1, "seed": 0}}  # fmt: skip
    (tmp_path / "recipe.json").write_text(json.dumps(recipe))
    env = {**os.environ, "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-m", "modeling_brillm.train", "--config", str(tmp_path / "recipe.json")]
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=600)
    assert result.returncode == 0, result.stderr[-3000:]
    # The trained folder carries the prepared one's config and tokenizer (`brillm train` starts from them).
    for name in ("tokenizer_config.json", "config.json"):
        prepared, trained = (json.loads((tmp_path / folder / name).read_text()) for folder in ("prepared/model", "trained"))
        for key in ("bos_token", "eos_token", "model_max_length", "context_length"):
            assert prepared.get(key) == trained.get(key), (name, key)
    tasks = write_tasks(tmp_path / "tasks", *english_texts())
    check_against_ours(tmp_path / "trained", run_lm_eval(tmp_path / "trained", tasks, tmp_path / "results"))


def test_lm_eval_on_a_converted_folder(tmp_path, fixture_dir, reference_converter):
    vocab = json.loads((fixture_dir / "vocab.json").read_text())
    words = Tokenizer(models.WordLevel(vocab=vocab, unk_token="[UNK]"))
    words.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    words.save(str(tmp_path / "words.json"))
    result = reference_converter(tmp_path / "converted", "--tokenizer-json", str(tmp_path / "words.json"))
    assert result.returncode == 0, result.stderr
    tasks = write_tasks(tmp_path / "tasks", *word_texts(vocab))
    samples = run_lm_eval(tmp_path / "converted", tasks, tmp_path / "results")
    check_against_ours(tmp_path / "converted", samples)
