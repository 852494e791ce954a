"""How good is BriLLM really: BriLLM against KenLM n-grams and a small GPT-2, on the same tokens.

    python benchmarks/quality.py --config configuration/quality/quick.yaml       # bundled corpus (CI smoke test)
    python benchmarks/quality.py --config configuration/quality/full.yaml        # prepared English corpus, a snapshot
    python benchmarks/quality.py --config configuration/quality/zh.yaml          # People's Daily to convergence
    python benchmarks/quality.py --config configuration/quality/zh-poetry.yaml   # Chinese poems at a fixed budget
    python benchmarks/quality.py --config configuration/quality/en.yaml          # English BPE to convergence
    python benchmarks/quality.py --install-kenlm                                 # only build KenLM (apt + cmake, ~2 min)
    python benchmarks/quality.py --figure docs/quality-en.png outputs/quality/en-char outputs/quality/en   # one figure

What a recipe takes on 2 CPU cores is measured and stated in one place: its header.

One recipe (``configuration/quality/*.yaml``) names a corpus folder (``train.txt`` + ``valid.txt``, as
``brillm prepare-corpus`` writes), the tokenizer and the runs. The script

1. prepares the corpus once with ``brillm prepare``'s `preparation.prepare` (tokenizer, 32-token samples); extra
   validation files (e.g. ``valid_wikipedia.txt``) are normalised, tokenized and packed the same way;
2. picks ``eval_samples`` evenly spaced samples of every validation set: **every model is scored on exactly these
   tokens**, with one definition: a sample of L real tokens scores tokens 2..L, each given the tokens before it
   in the same sample (the first token has no context and is not scored); per-token perplexity is
   ``exp(sum nll / scored tokens)`` and bits/char is ``sum nll / ln 2 / characters of the scored tokens`` (the
   dataset's ``num_chars``, the same denominator for every model);
3. trains every BriLLM run (the graph counted on the training samples with the run's ``min_edge_count``,
   reference init, AdamW with the run's learning-rate schedule, ``brillm train``'s data order and objectives,
   for a number of tokens or of epochs, optionally stopped by the convergence rule on a development set set
   aside from the training samples; the wall-clock excludes evaluation), one GPT-2 run
   (``transformers.GPT2Config``) on the same batches, evaluated after as many tokens and as much wall-clock as
   the reference BriLLM run (and where the convergence rule stops it), and KenLM modified Kneser-Ney models
   (``lmplz``) of the orders asked for;
4. writes ``results.json``, ``results.md`` (the tables) and ``quality.png`` (validation bits/char against
   training tokens; n-gram levels as horizontal lines) into the output folder.

Every finished run's record is saved in the output folder's ``runs/`` and reused while its settings and texts
match, so an interrupted study resumes; a run in training saves its progress there too (``<name>.progress/``:
weights, optimizer state, curves) at every epoch end and every ``--checkpoint-minutes`` (30) of training, and a
killed run goes on from its last save with the same numbers. ``--records DIR`` also reads and saves the finished
records in ``DIR``: the records committed under ``docs/quality-runs/<recipe>/`` let a study of hours go on in a
later session or on another machine (e.g. GPT-2 against a committed BriLLM run) and rebuild its tables without
retraining.

KenLM sees token ids as words ("w17 w4 ..."). It is trained on the token stream of the same training samples:
consecutive samples of one run of text overlap by one token (see `modeling_brillm.data`), so they are chained
back into the run and every run is one ``lmplz`` sentence (``<s> ... </s>``); an n-gram thus also counts n-grams
that cross the 32-token sample boundaries the neural models never see across. It is scored with
``query -n`` (no ``<s>``/``</s>`` added): every validation sample is one line, its first token is scored from no
context and dropped, so each scored token is conditioned on at most the order-1 tokens before it *within the
sample*, as the neural models are. A validation token the n-gram never saw gets ``p(<unk>|context)`` divided by
the number of token ids it never saw, so its probabilities form a distribution over the same vocabulary (the mass
it keeps for ``</s>`` is lost, a small handicap for the n-gram). The "equal tokens" n-gram is trained on exactly
the samples the reference BriLLM run saw, one sample per sentence.

KenLM (PyPI ``kenlm==0.3.0`` sdist, pinned by sha256) is built with cmake into ``~/.cache/brillm/kenlm`` (outside
git) after installing Debian's ``cmake g++ libboost-{program-options,system,thread,test}-dev`` with apt-get (as
root). ``--no-install-kenlm`` uses a cached build only and skips the n-grams (with the reason printed) without one.
"""

import argparse
import functools
import hashlib
import json
import math
import os
import shutil
import subprocess
import sys
import tarfile
import tempfile
import time
from pathlib import Path

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # read when torch is imported: huge pages halve BriLLM steps
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("HF_DATASETS_OFFLINE", "1")

KENLM_CACHE = Path.home() / ".cache" / "brillm" / "kenlm"
KENLM_SDIST = ("kenlm", "0.3.0", "kenlm-0.3.0.tar.gz", "c4628bb9fb63c8a6f9240035b8b037385cfc404cb72e933cf48878291edac1e8")
KENLM_APT = [
    "cmake", "g++", "make", "libboost-program-options-dev", "libboost-system-dev", "libboost-thread-dev",
    "libboost-test-dev", "zlib1g-dev", "libbz2-dev", "liblzma-dev",
]  # fmt: skip

# ----------------------------------------------------------------------------------------------------------------
# Recipe


BRILLM_KEYS = {
    "name": None,
    "groups": ["main"],  # table sections this run belongs to: main, density, positions, objective
    "hidden_size": 16,
    "min_edge_count": 1,
    "objective": "full",  # "full" or "sampled" (the reference 1 + num_negatives candidates)
    "num_negatives": 400,
    "positions": "learned",  # "learned" (softmax-weighted mean of all energies) or "last" (only the last energy)
    "learning_rate": 0.01,
    "lr_scheduler_type": "constant",  # a transformers scheduler name (`brillm train`'s train.lr_scheduler_type)
    "warmup_steps": 0,
    "batch_size": 16,
    "train_tokens": 20000,  # the schedule's length is this many tokens of full samples
    "epochs": None,  # instead of train_tokens: this many passes over the training samples (the schedule's length)
    "converge": False,  # stop by the recipe's convergence rule (needs epochs and dev_samples)
    "max_seconds": None,  # stop earlier when training took this long
    "curve": False,  # evaluate at curve_points milestones (for the plot)
    "reference": False,  # GPT-2 and the "equal tokens" n-gram are matched to this run
}
GPT2_KEYS = {
    "name": "gpt2",
    "n_embd": 256,
    "n_layer": 4,
    "n_head": 4,
    "learning_rate": 1e-3,
    "lr_scheduler_type": "constant_with_warmup",  # it stops by wall-clock: a schedule that does not need a length
    "warmup_steps": 50,
    "batch_size": None,  # default: the reference BriLLM run's (so both see the same batches)
    "max_seconds": None,  # default: the reference BriLLM run's training wall-clock ("equal wall-clock")
    "epochs": None,  # with converge: GPT-2 also trains by the convergence rule, at most this many epochs
    "converge": False,
    # With converge, GPT-2 trains on past the rule's stop (or its epoch cap) to the reference's tokens. False: it stops
    # there, with no "equal tokens" row (for a reference that trained longer than a GPT-2 run fits in a session).
    "equal_tokens": True,
}
RECIPE_KEYS = {
    "name": None,
    "output_dir": None,
    "corpus": None,  # a folder with train.txt and valid.txt
    "fetch_corpus": None,  # a `brillm prepare-corpus` target written into `corpus` when train.txt is missing
    "validation": {"valid": "prepared"},  # name: "prepared" (the prepared valid split) or a file in `corpus`
    "tokenizer": "bpe",
    "vocab_size": 1000,
    "seq_len": 32,
    "eval_samples": 256,  # evenly spaced samples per validation set; 0: all
    "eval_batch_size": 64,
    "curve_points": 3,
    "seed": 0,
    # Training samples held out as the development set (evenly spaced, removed from training and from the graph):
    # the convergence rule and learning-rate sweeps read it, never the reported validation texts.
    "dev_samples": 0,
    # A run with `converge: true` stops at the first epoch end, from min_epochs on, where its development-set
    # bits/char improved by less than min_improvement over the epoch (or after its `epochs`, the schedule's length).
    "convergence": {"min_epochs": 3, "min_improvement": 0.01},
    "kenlm": {"orders": [2, 3, 5], "equal_tokens_order": 3, "memory": "2G"},
    "brillm_defaults": {},
    "brillm": [],
    "gpt2": {},
}


def load_recipe(path):
    """The recipe as a dict with every default filled in; unknown keys are errors."""
    import yaml

    raw = yaml.safe_load(Path(path).read_text(encoding="utf-8")) or {}
    unknown = set(raw) - set(RECIPE_KEYS)
    if unknown:
        raise ValueError(f"{path}: unknown keys {sorted(unknown)}; allowed: {sorted(RECIPE_KEYS)}")
    recipe = {key: raw.get(key, default) for key, default in RECIPE_KEYS.items()}
    recipe["name"] = recipe["name"] or Path(path).stem
    recipe["output_dir"] = recipe["output_dir"] or f"outputs/quality/{recipe['name']}"
    recipe["kenlm"] = {**RECIPE_KEYS["kenlm"], **(raw.get("kenlm") or {})}
    recipe["convergence"] = {**RECIPE_KEYS["convergence"], **(raw.get("convergence") or {})}
    defaults = {**BRILLM_KEYS, **recipe["brillm_defaults"]}
    runs = []
    for entry in recipe["brillm"]:
        bad = set(entry) - set(BRILLM_KEYS)
        if bad:
            raise ValueError(f"{path}: unknown brillm keys {sorted(bad)}; allowed: {sorted(BRILLM_KEYS)}")
        run = {**defaults, **entry}
        if run["objective"] not in ("full", "sampled") or run["positions"] not in ("learned", "last"):
            raise ValueError(f"{path}: {run['name']}: objective must be full|sampled, positions learned|last.")
        _check_convergence(path, run, recipe)
        runs.append(run)
    if sum(run["reference"] for run in runs) != 1:
        raise ValueError(f"{path}: exactly one brillm run must say `reference: true`.")
    recipe["brillm"] = runs
    bad = set(recipe["gpt2"] or {}) - set(GPT2_KEYS)
    if bad:
        raise ValueError(f"{path}: unknown gpt2 keys {sorted(bad)}; allowed: {sorted(GPT2_KEYS)}")
    recipe["gpt2"] = {**GPT2_KEYS, **(recipe["gpt2"] or {})}
    _check_convergence(path, recipe["gpt2"], recipe)
    if not (recipe["gpt2"]["equal_tokens"] or recipe["gpt2"]["converge"]):
        raise ValueError(f"{path}: gpt2: equal_tokens: false needs converge (its epoch cap is where it stops).")
    return recipe


def _check_convergence(path, run, recipe):
    if run["converge"] and not (run["epochs"] and recipe["dev_samples"]):
        raise ValueError(f"{path}: {run['name']}: converge needs epochs (the most it may train) and dev_samples.")


def say(*parts):
    print(time.strftime("[%H:%M:%S]"), *parts, flush=True)


# ----------------------------------------------------------------------------------------------------------------
# Data: one prepared corpus, the evaluation samples


def prepare(recipe, output_dir):
    """`preparation.prepare` once (reused while its settings match); returns the prepared folder."""
    from modeling_brillm.corpora import sha256_file
    from modeling_brillm.preparation import prepare as prepare_folder

    corpus = Path(recipe["corpus"])
    if not (corpus / "train.txt").is_file():
        if not recipe["fetch_corpus"]:
            raise FileNotFoundError(f"{corpus}/train.txt is missing (and the recipe names no fetch_corpus).")
        from modeling_brillm.corpora import fetch_corpus

        say(f"fetching corpus {recipe['fetch_corpus']!r} into {corpus}")
        fetch_corpus(recipe["fetch_corpus"], corpus)
    prepared = output_dir / "prepared"
    wanted = {
        "corpus": str(corpus.resolve()),
        "tokenizer": recipe["tokenizer"],
        "vocab_size": recipe["vocab_size"],
        "seq_len": recipe["seq_len"],
        "train_sha256": sha256_file(corpus / "train.txt"),
        "valid_sha256": sha256_file(corpus / "valid.txt"),
    }
    stamp = prepared / "quality-stamp.json"
    if stamp.is_file() and json.loads(stamp.read_text()) == wanted:
        say(f"reusing {prepared}")
        return prepared
    started = time.perf_counter()
    # The prepared model is not used (every run builds its own on the counted graph): keep it tiny (d = 2).
    prepare_folder([corpus], prepared, tokenizer=recipe["tokenizer"], vocab_size=recipe["vocab_size"],
                   seq_len=recipe["seq_len"], min_edge_count=1, hidden_size=2, seed=recipe["seed"], log=None)  # fmt: skip
    stamp.write_text(json.dumps(wanted, indent=1))
    say(f"prepared {corpus} in {time.perf_counter() - started:.1f} s -> {prepared}")
    return prepared


def development_split(train_split, count):
    """``(training samples, development samples)``: ``count`` evenly spaced training samples set aside (as
    `sample_tensors`; `None` when ``count`` is 0)."""
    from modeling_brillm.data import sample_tensors

    if not count:
        return train_split, None
    chosen = set(torch_linspace(len(train_split), count))
    kept = [row for row in range(len(train_split)) if row not in chosen]
    say(f"development set: {len(chosen)} training samples set aside")
    return train_split.select(kept), sample_tensors(train_split.select(sorted(chosen)))


def validation_sets(recipe, prepared, dataset, tokenizer):
    """{name: samples} for every validation set: (input_ids, attention_mask, num_chars) of the chosen samples."""
    from datasets import load_dataset

    from modeling_brillm.data import sample_tensors, tokenize_and_pack, write_corpus_split

    sets = {}
    for name, source in recipe["validation"].items():
        if source == "prepared":
            split = dataset["validation"]
        else:
            path = Path(recipe["corpus"]) / source
            with tempfile.TemporaryDirectory() as tmp:  # the same checks and normalisation as the prepared text
                write_corpus_split([path], [path], Path(tmp) / "text")
                lines = load_dataset("text", data_files={"validation": str(Path(tmp) / "text" / "valid.txt")},
                                     keep_linebreaks=True, cache_dir=str(Path(tmp) / "cache"))["validation"]  # fmt: skip
                split = sample_tensors(tokenize_and_pack(lines, tokenizer, recipe["seq_len"]))
        tensors = split if isinstance(split, dict) else sample_tensors(split)
        total = len(tensors["input_ids"])
        count = recipe["eval_samples"] or total
        rows = sorted({int(i) for i in (torch_linspace(total, min(count, total)))})
        chosen = {key: value[rows] for key, value in tensors.items()}
        chosen["total_samples"] = total
        sets[name] = chosen
        scored = int((chosen["attention_mask"][:, 1:].bool() & chosen["attention_mask"][:, :-1].bool()).sum())
        say(f"validation {name}: {len(rows)} of {total} samples, {scored} scored tokens, "
            f"{int(chosen['num_chars'].sum())} characters")  # fmt: skip
    return sets


def torch_linspace(total, count):
    import torch

    return torch.linspace(0, total - 1, count).round().long().tolist()


def evaluate(model, samples, batch_size):
    """Summed full-vocabulary NLL of a model (BriLLM or GPT-2) over the chosen samples: `summarize_nll`."""
    from modeling_brillm.evaluation import evaluate_nll, summarize_nll

    def batches():
        for start in range(0, len(samples["input_ids"]), batch_size):
            yield {key: samples[key][start : start + batch_size] for key in ("input_ids", "attention_mask", "num_chars")}

    return summarize_nll(evaluate_nll(model, batches()))


def evaluate_all(model, valid, batch_size):
    return {name: evaluate(model, samples, batch_size) for name, samples in valid.items()}


# ----------------------------------------------------------------------------------------------------------------
# Training loops (BriLLM and GPT-2 share the data order and the timing rules)


class RunProgress:
    """A run's saved progress in ``folder`` (``runs/<name>.progress/``), so that a run killed with its session resumes.

    `run_training` saves at every epoch end and after every ``every_seconds`` of training (at a step boundary;
    ``None``: at epoch ends only): the model (safetensors), the optimizer, scheduler and RNG states, and the
    loop's counters, curves and the ``carry`` dicts of its callers (the convergence histories). A later run with
    the same settings ``key`` goes on from there, as if never stopped: the same batches, the same numbers. Saving
    is atomic (a staged folder) and outside the timed training; a progress of other settings is discarded.

    Example (the folder holds nothing yet):

    ```python
    >>> import tempfile
    >>> progress = RunProgress(Path(tempfile.mkdtemp()) / "b.progress", key="abc", every_seconds=1800)
    >>> progress.load(model=None, optimizer=None, scheduler=None) is None
    True

    ```
    """

    def __init__(self, folder, key, every_seconds):
        self.folder, self.key, self.every_seconds = Path(folder), key, every_seconds
        self.saved_at = 0.0  # the training seconds of the last save (or of the loaded one)

    def due(self, ends_epoch, seconds):
        """Whether to save after a step that ended at ``seconds`` of training (``ends_epoch``: the last of an epoch)."""
        return ends_epoch or (self.every_seconds is not None and seconds - self.saved_at >= self.every_seconds)

    def load(self, model, optimizer, scheduler):
        """The saved loop state (after loading model, optimizer, scheduler and RNG), or `None` (nothing to resume)."""
        import torch
        from safetensors.torch import load_model

        path = self.folder / "progress.json"
        if not path.is_file():
            return None
        state = json.loads(path.read_text())
        if state["key"] != self.key:
            say(f"{self.folder.name}: made with other settings, discarded")
            self.discard()
            return None
        load_model(model, self.folder / "model.safetensors")
        saved = torch.load(self.folder / "optimizer.pt", weights_only=True)
        optimizer.load_state_dict(saved["optimizer"])
        scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["rng"])
        state["at_tokens"] = {int(mark): value for mark, value in state["at_tokens"].items()}
        self.saved_at = state["seconds"]
        return state

    def save(self, model, optimizer, scheduler, state):
        import torch
        from safetensors.torch import save_model

        from modeling_brillm.output_folders import staged_folder

        with staged_folder(self.folder) as staging:
            save_model(model, str(staging / "model.safetensors"))
            states = {"optimizer": optimizer.state_dict(), "scheduler": scheduler.state_dict(), "rng": torch.get_rng_state()}
            torch.save(states, staging / "optimizer.pt")
            (staging / "progress.json").write_text(json.dumps({**state, "key": self.key}))
        self.saved_at = state["seconds"]

    def discard(self):
        shutil.rmtree(self.folder, ignore_errors=True)


def run_training(name, model, loss_fn, train_set, settings, valid, milestones, eval_batch_size, primary, stop,
                 num_steps=None, full_eval_at=(), epoch_check=None, time_mark=None, progress=None, carry=None):  # fmt: skip
    """Train ``model`` with `brillm train`'s step (`train_step`: AdamW, the run's learning-rate schedule over
    ``num_steps`` optimizer steps) in its data order (`batch_stream`) until, at an epoch end,
    ``epoch_check(epochs_done, model)`` (`convergence_check`) or ``stop(tokens, seconds)`` says so (the epoch check
    first); evaluate on the primary validation set when the tokens pass one of ``milestones``, at the end of every
    epoch and at the end, on every set at the marks in ``full_eval_at`` and when the training seconds first pass
    ``time_mark``, with the clock paused. With ``progress`` (a `RunProgress`) it resumes from and saves to its
    folder, ``carry`` (name: dict, updated in place) included. Returns the curve, the tokens, the training seconds,
    the indices of the samples seen, and the full evaluations by token mark (``at_tokens``) and at the time mark
    (``at_time``)."""
    from modeling_brillm.train import (LENGTH_FREE_SCHEDULES, TrainRecipe, batch_stream, build_optimizer,
                                       build_scheduler, check_schedule, train_step)  # fmt: skip

    recipe = TrainRecipe(learning_rate=settings["learning_rate"], batch_size=settings["batch_size"],
                         lr_scheduler_type=settings["lr_scheduler_type"], warmup_steps=settings["warmup_steps"] or 0)  # fmt: skip
    check_schedule(recipe, name)
    if num_steps is None and recipe.lr_scheduler_type not in LENGTH_FREE_SCHEDULES:
        raise ValueError(f"{name}: a run stopped by wall-clock cannot follow the {recipe.lr_scheduler_type} schedule.")
    optimizer = build_optimizer(model, recipe)
    scheduler = build_scheduler(optimizer, recipe, num_steps or 1)
    ids, mask = train_set["input_ids"], train_set["attention_mask"]
    carry = carry or {}
    state = {"milestones": sorted(set(milestones) | set(full_eval_at)), "curve": [], "seen": [], "at_tokens": {},
             "at_time": None, "tokens": 0, "steps": 0, "seconds": 0.0, "epoch": 0, "batch_in_epoch": 0,
             "loss": None, "load_before": os.getloadavg()[0], "resumed": 0}  # fmt: skip
    saved = progress.load(model, optimizer, scheduler) if progress is not None else None
    if saved is not None:
        for key, values in saved.pop("carry").items():
            carry[key].clear()
            carry[key].update(values)
        state.update(saved, resumed=saved["resumed"] + 1)
        say(f"{name}: resuming its saved progress at step {state['steps']} ({state['seconds']:.0f} s trained)")
    milestones, curve, seen, at_tokens = state["milestones"], state["curve"], state["seen"], state["at_tokens"]
    at_time, tokens, steps, seconds = state["at_time"], state["tokens"], state["steps"], state["seconds"]
    last_log = time.perf_counter()
    model.train()
    stream = batch_stream(len(ids), recipe.batch_size, settings.get("seed", 0), epoch=state["epoch"],
                          batch_in_epoch=state["batch_in_epoch"])  # fmt: skip
    for epoch, index, rows, ends_epoch in stream:
        started = time.perf_counter()
        loss = train_step(model, loss_fn, ids[rows], mask[rows], optimizer, scheduler)
        seconds += time.perf_counter() - started
        tokens += int(mask[rows].sum())
        steps += 1
        seen.extend(rows)
        if time.perf_counter() - last_log > 60:
            say(f"{name}: step {steps}, {tokens} tokens, {seconds:.0f} s, loss {loss.item():.3f}, "
                f"{tokens / seconds:.0f} tokens/s")  # fmt: skip
            last_log = time.perf_counter()
        done = (ends_epoch and epoch_check is not None and epoch_check(epoch + 1, model)) or stop(tokens, seconds)
        passed = [mark for mark in milestones if mark <= tokens]
        milestones = [mark for mark in milestones if mark > tokens]
        timed = time_mark is not None and at_time is None and seconds >= time_mark
        if passed or done or ends_epoch or timed:
            full = timed or any(mark in full_eval_at for mark in passed)
            metrics = evaluate_all(model, valid, eval_batch_size) if full else {primary: evaluate(model, valid[primary], eval_batch_size)}
            model.train()
            point = {"tokens": tokens, "seconds": round(seconds, 2), "steps": steps, "metrics": metrics[primary]}
            curve.append({**point, **({"epoch": epoch + 1} if ends_epoch else {})})
            for mark in passed:
                if mark in full_eval_at:
                    at_tokens[mark] = {"tokens": tokens, "seconds": round(seconds, 2), "metrics": metrics}
            if timed:
                at_time = {"tokens": tokens, "seconds": round(seconds, 2), "metrics": metrics}
            say(f"{name}: {tokens} tokens, {seconds:.1f} s{f', epoch {epoch + 1}' if ends_epoch else ''}: "
                f"{primary} bits/char {metrics[primary]['bits_per_char']}")  # fmt: skip
        if done:
            break
        if progress is not None and progress.due(ends_epoch, seconds):
            state.update(milestones=milestones, at_time=at_time, tokens=tokens, steps=steps, seconds=seconds,
                         epoch=epoch + ends_epoch, batch_in_epoch=0 if ends_epoch else index + 1, loss=loss.item())  # fmt: skip
            progress.save(model, optimizer, scheduler, {**state, "carry": carry})
    # The 1-minute load average before and after: other processes on the machine slow the run down.
    load = [round(state["load_before"], 2), round(os.getloadavg()[0], 2)]
    return {"curve": curve, "tokens": tokens, "steps": steps, "seconds": round(seconds, 2), "seen": seen,
            "at_tokens": at_tokens, "at_time": at_time, "final_loss": loss.item(), "load_average": load,
            "resumed": state["resumed"]}  # fmt: skip


def convergence_check(dev, eval_batch_size, min_epochs, min_improvement, max_epochs):
    """``(check, history)``: ``check(epochs_done, model)`` scores the development samples ``dev``, appends the
    bits/char to ``history["bits_per_char"]`` and says whether to stop: after ``max_epochs``, or from
    ``min_epochs`` on once an epoch improved them by less than ``min_improvement`` (``history["converged_at"]``:
    that epoch)."""
    history = {"bits_per_char": [], "converged_at": None}

    def check(epochs_done, model):
        bits = history["bits_per_char"]
        bits.append(evaluate(model, dev, eval_batch_size)["bits_per_char"])
        model.train()
        if epochs_done >= min_epochs and len(bits) > 1 and bits[-2] - bits[-1] < min_improvement:
            history["converged_at"] = epochs_done
        say(f"epoch {epochs_done}: development bits/char {bits[-1]}"
            f"{' (converged)' if history['converged_at'] else ''}")  # fmt: skip
        return epochs_done >= max_epochs or history["converged_at"] is not None

    return check, history


def training_limits(run, recipe, train_set, dev):
    """``(stop, num_steps, epoch_check, dev_history)`` of a run: by tokens (``train_tokens``, ``max_seconds``) or
    by epochs (``epochs``, with the convergence rule when ``converge``)."""
    num_samples = len(train_set["input_ids"])
    if run["epochs"]:
        num_steps = run["epochs"] * (num_samples // run["batch_size"])
        if dev is None:  # no development set (so no convergence rule): just the epochs
            return (lambda tokens, seconds: False), num_steps, (lambda done, model: done >= run["epochs"]), None
        min_improvement = recipe["convergence"]["min_improvement"] if run["converge"] else -math.inf
        check, history = convergence_check(dev, recipe["eval_batch_size"], recipe["convergence"]["min_epochs"],
                                           min_improvement, run["epochs"])  # fmt: skip
        return (lambda tokens, seconds: False), num_steps, check, history
    limit_tokens, limit_seconds = run["train_tokens"], run["max_seconds"]
    num_steps = steps_to_tokens(train_set["attention_mask"], run["batch_size"], recipe["seed"], limit_tokens)

    def stop(tokens, seconds):
        return tokens >= limit_tokens or (limit_seconds is not None and seconds >= limit_seconds)

    return stop, num_steps, None, None


def steps_to_tokens(mask, batch_size, seed, tokens):
    """The steps `batch_stream` takes to pass ``tokens`` real tokens: the length of a token-budget run's schedule
    (padded samples hold fewer than ``seq_len``, so the schedule ends where the run does, not before)."""
    from modeling_brillm.train import batch_stream

    per_sample = mask.sum(dim=1).tolist()
    seen, steps = 0, 0
    for _, _, rows, _ in batch_stream(len(per_sample), batch_size, seed):
        seen += sum(per_sample[row] for row in rows)
        steps += 1
        if seen >= tokens:
            return steps


def brillm_model(run, graph_counts, tokenizer, vocab_size, seed):
    """A reference-initialised BriLLM on the training bigrams counted ``min_edge_count`` times or more."""
    import torch

    from modeling_brillm import BriLLMConfig
    from modeling_brillm.graph_building import build_graph
    from modeling_brillm.preparation import model_from_graph

    graph = build_graph(graph_counts, vocab_size=vocab_size, min_edge_count=run["min_edge_count"])
    config = BriLLMConfig(vocab_size=vocab_size, hidden_size=run["hidden_size"], max_position_embeddings=512,
                          num_slots=graph.num_slots, pad_token_id=tokenizer.pad_token_id,
                          unk_token_id=tokenizer.unk_token_id)  # fmt: skip
    model = model_from_graph(config, graph, seed=seed)
    if run["positions"] == "last":
        # Only the last energy: positional logits that rise by 1000 per edge make softmax(positions[0:i]) one-hot
        # on edge i-1 (exp(-1000) == 0 in float32), so the signal is exactly the last edge's energy. Frozen (its
        # gradient is exactly 0 anyway). The model code is unchanged.
        with torch.no_grad():
            positions = model.base_model.positions
            positions.copy_(1000.0 * torch.arange(positions.shape[1], dtype=positions.dtype).view_as(positions))
        model.base_model.positions.requires_grad_(False)
    return model, graph


def brillm_loss(run, successors):
    """`brillm train`'s objective with the run's settings bound."""
    from functools import partial

    from modeling_brillm.train import objective_loss

    return partial(objective_loss, objective=run["objective"], successors=successors, num_negatives=run["num_negatives"])


def active_brillm(graph, hidden_size, samples):
    """Mean parameters read to score all V successors of a validation position: the slot-0 matrix and bias plus the
    source's own slab, (1 + own edges) x (d^2 + d)."""
    import numpy as np

    ids, mask = samples["input_ids"].numpy(), samples["attention_mask"].numpy().astype(bool)
    sources = ids[:, :-1][mask[:, :-1] & mask[:, 1:]]
    degrees = np.diff(graph.row_ptr)[sources]
    return float((1 + degrees).mean() * (hidden_size * hidden_size + hidden_size))


def gpt2_model(settings, vocab_size, seq_len, seed):
    import torch
    from transformers import GPT2Config, GPT2LMHeadModel

    torch.manual_seed(seed)
    config = GPT2Config(vocab_size=vocab_size, n_positions=seq_len, n_embd=settings["n_embd"],
                        n_layer=settings["n_layer"], n_head=settings["n_head"], resid_pdrop=0.0, embd_pdrop=0.0,
                        attn_pdrop=0.0, bos_token_id=None, eos_token_id=None, pad_token_id=None)  # fmt: skip
    return GPT2LMHeadModel(config)


def gpt2_loss(model, ids, mask):
    return model(input_ids=ids, attention_mask=mask, labels=ids.masked_fill(mask == 0, -100)).loss


# ----------------------------------------------------------------------------------------------------------------
# KenLM


class KenLMUnavailable(RuntimeError):
    pass


def ensure_kenlm(install=True, cache_dir=KENLM_CACHE):
    """The folder holding ``lmplz`` and ``query``: a cached build, or (``install``) apt-get + pip download + cmake."""
    bin_dir = Path(cache_dir) / "bin"
    if (bin_dir / "lmplz").is_file() and (bin_dir / "query").is_file():
        return bin_dir
    if not install:
        raise KenLMUnavailable(f"no KenLM build in {bin_dir} (run `python benchmarks/quality.py --install-kenlm`)")
    started = time.perf_counter()
    cache_dir = Path(cache_dir)
    cache_dir.mkdir(parents=True, exist_ok=True)
    if not shutil.which("dpkg"):
        raise KenLMUnavailable("building KenLM here needs a Debian system (dpkg, apt-get) for cmake and boost")
    missing = [name for name in KENLM_APT if subprocess.run(["dpkg", "-s", name], capture_output=True).returncode]
    if missing:
        if os.geteuid() != 0 or not shutil.which("apt-get"):
            raise KenLMUnavailable(f"KenLM needs the Debian packages {' '.join(missing)} (apt-get install as root)")
        say(f"apt-get install {' '.join(missing)}")
        env = {**os.environ, "DEBIAN_FRONTEND": "noninteractive"}
        for command in (["apt-get", "update", "-qq"], ["apt-get", "install", "-y", "-qq", "--no-install-recommends", *missing]):
            result = subprocess.run(command, capture_output=True, text=True, env=env)
            if result.returncode:
                raise KenLMUnavailable(f"`{' '.join(command)}` failed: {result.stderr.strip()[-400:]}")
    name, version, filename, sha256 = KENLM_SDIST
    sdist = cache_dir / filename
    if not sdist.is_file():
        # --no-binary for kenlm only: its build requirements (setuptools, cmake) come as wheels.
        command = [sys.executable, "-m", "pip", "download", "--no-deps", "--no-binary", name, "-d", str(cache_dir),
                   f"{name}=={version}"]  # fmt: skip
        result = subprocess.run(command, capture_output=True, text=True)
        if result.returncode or not sdist.is_file():
            raise KenLMUnavailable(f"`pip download {name}=={version}` failed: {result.stderr.strip()[-400:]}")
    if hashlib.sha256(sdist.read_bytes()).hexdigest() != sha256:  # (runs before the package is installed)
        raise KenLMUnavailable(f"{sdist} does not have the pinned sha256 {sha256}: delete it and run again")
    with tempfile.TemporaryDirectory(dir=cache_dir) as tmp:
        with tarfile.open(sdist) as archive:
            archive.extractall(tmp, filter="data")
        source = Path(tmp) / f"{name}-{version}"
        build = source / "build"
        build.mkdir()
        jobs = str(os.cpu_count() or 2)
        for command in (["cmake", "..", "-DCMAKE_BUILD_TYPE=Release"], ["make", "-j", jobs, "lmplz", "query"]):
            result = subprocess.run(command, cwd=build, capture_output=True, text=True)
            if result.returncode:
                raise KenLMUnavailable(f"`{' '.join(command)}` failed: {(result.stderr or result.stdout).strip()[-600:]}")
        staging = cache_dir / "bin.tmp"
        shutil.rmtree(staging, ignore_errors=True)
        staging.mkdir()
        for tool in ("lmplz", "query"):
            shutil.copy2(build / "bin" / tool, staging / tool)
        shutil.rmtree(bin_dir, ignore_errors=True)
        os.replace(staging, bin_dir)
    say(f"KenLM built in {time.perf_counter() - started:.0f} s -> {bin_dir}")
    return bin_dir


def training_runs(train_set):
    """The token streams the packed training samples were cut from: a full sample whose successor starts with its
    last token continues into it (blocks overlap by one token); a padded sample ends its run."""
    ids, mask = train_set["input_ids"].tolist(), train_set["attention_mask"].tolist()
    runs, current, full_previous = [], [], False
    for row, row_mask in zip(ids, mask):
        tokens = row[: sum(row_mask)]
        if full_previous and current and tokens and tokens[0] == current[-1]:
            current.extend(tokens[1:])
        else:
            if current:
                runs.append(current)
            current = list(tokens)
        full_previous = sum(row_mask) == len(row)
    if current:
        runs.append(current)
    return runs


def _write_sentences(path, sentences):
    with open(path, "w", encoding="ascii") as f:
        for tokens in sentences:
            f.write(" ".join(f"w{t}" for t in tokens) + "\n")


def train_kenlm(bin_dir, sentences, order, folder, memory):
    """lmplz (modified Kneser-Ney) on token-id sentences; returns (arpa path, n-gram counts, seconds, words seen)."""
    folder.mkdir(parents=True, exist_ok=True)
    text, arpa = folder / "train.txt", folder / f"order{order}.arpa"
    _write_sentences(text, sentences)
    started = time.perf_counter()
    with open(text, "rb") as stdin, open(arpa, "wb") as stdout:
        result = subprocess.run([str(bin_dir / "lmplz"), "-o", str(order), "--discount_fallback", "-S", memory,
                                 "-T", str(folder)], stdin=stdin, stdout=stdout, stderr=subprocess.PIPE)  # fmt: skip
    if result.returncode:
        raise RuntimeError(f"lmplz -o {order} failed: {result.stderr.decode()[-600:]}")
    seconds = time.perf_counter() - started
    counts = []
    with open(arpa, encoding="ascii") as f:
        for line in f:
            if line.startswith("ngram "):
                counts.append(int(line.split("=")[1]))
            elif line.startswith("\\1-grams"):
                break
    seen = {t for tokens in sentences for t in tokens}
    text.unlink()
    return arpa, counts, seconds, seen


def score_kenlm(bin_dir, arpa, samples, seen, vocab_size):
    """`summarize_nll` of the n-gram on the chosen samples, with the definition of the module docstring."""
    from modeling_brillm.evaluation import summarize_nll

    ids, mask = samples["input_ids"].tolist(), samples["attention_mask"].tolist()
    sentences = [row[: sum(m)] for row, m in zip(ids, mask)]
    unseen = vocab_size - len(seen)
    with tempfile.NamedTemporaryFile("w", suffix=".txt", delete=False) as f:
        path = f.name
    try:
        _write_sentences(path, sentences)
        with open(path, "rb") as stdin:
            result = subprocess.run([str(bin_dir / "query"), "-n", "-v", "word", str(arpa)], stdin=stdin,
                                    capture_output=True)  # fmt: skip
    finally:
        os.unlink(path)
    if result.returncode:
        raise RuntimeError(f"query failed: {result.stderr.decode()[-600:]}")
    words = [w for w in result.stdout.decode().split("\t") if "=" in w]
    if len(words) != sum(map(len, sentences)):
        raise RuntimeError(f"query returned {len(words)} word scores for {sum(map(len, sentences))} words")
    nll, tokens, oov, position = 0.0, 0, 0, 0
    for sentence in sentences:
        for index in range(len(sentence)):
            word = words[position]
            position += 1
            if index == 0:
                continue  # no context: not scored (as for the neural models)
            vocab_id, _, log10p = word.rsplit("=", 1)[1].split()
            nats = -float(log10p) * math.log(10)
            if vocab_id == "0":  # <unk>: its mass is shared by the ids the n-gram never saw
                nats += math.log(max(unseen, 1))
                oov += 1
            nll += nats
            tokens += 1
    result = summarize_nll({"nll": nll, "tokens": tokens, "characters": float(samples["num_chars"].sum())})
    return {**result, "oov_tokens": oov}


# ----------------------------------------------------------------------------------------------------------------
# The study


def main(argv=None):
    parser = argparse.ArgumentParser(description="BriLLM vs KenLM vs GPT-2 on the same tokens")
    parser.add_argument("--config", help="a recipe, e.g. configuration/quality/quick.yaml")
    parser.add_argument("--output-dir", help="overrides the recipe's output_dir")
    parser.add_argument("--install-kenlm", action="store_true", help="only make sure KenLM is built, then exit")
    parser.add_argument("--no-install-kenlm", action="store_true", help="use a cached KenLM build or skip the n-grams")
    parser.add_argument("--skip-kenlm", action="store_true")
    parser.add_argument("--skip-gpt2", action="store_true", help="no GPT-2 run (nor its cached record)")
    parser.add_argument("--only", nargs="+", help="run names to (re)train, brillm runs or gpt2 (others: earlier results)")
    parser.add_argument("--report-only", action="store_true", help="rewrite results.md and quality.png from results.json")
    parser.add_argument("--figure", nargs="+", metavar="PATH",
                        help="only draw PATH from the results.json of the study folders that follow, one panel each "
                             "(a language's studies: docs/quality-en.png outputs/quality/en-char outputs/quality/en)")  # fmt: skip
    parser.add_argument("--records", help="a folder of finished run records (e.g. docs/quality-runs/full) to reuse "
                                          "when their settings match, and where new ones are saved too")  # fmt: skip
    parser.add_argument("--checkpoint-minutes", type=float, default=30.0,
                        help="save a run's progress (runs/<name>.progress/) after this many minutes of training, as "
                             "at every epoch end, so a killed study resumes there (0: at epoch ends only)")  # fmt: skip
    args = parser.parse_args(argv)
    if args.install_kenlm:
        try:
            print(ensure_kenlm(install=True))
        except KenLMUnavailable as error:
            raise SystemExit(f"KenLM unavailable: {error}")
        return
    if args.figure:
        path, *folders = args.figure
        if not folders:
            parser.error("--figure needs a PATH and at least one study folder (with results.json)")
        plot([json.loads((Path(folder) / "results.json").read_text()) for folder in folders], path)
        return
    if not args.config:
        parser.error("--config is required")
    recipe = load_recipe(args.config)
    output_dir = Path(args.output_dir or recipe["output_dir"])
    output_dir.mkdir(parents=True, exist_ok=True)
    if args.report_only:
        results = json.loads((output_dir / "results.json").read_text())
        (output_dir / "results.md").write_text(results_markdown(results))
        plot([results], output_dir / "quality.png")
        return
    study_started = time.perf_counter()
    results = study(recipe, output_dir, args)
    results["study_seconds"] = round(time.perf_counter() - study_started, 1)
    (output_dir / "results.json").write_text(json.dumps(results, indent=1) + "\n")
    table = results_markdown(results)
    (output_dir / "results.md").write_text(table)
    plot([results], output_dir / "quality.png")
    print(table)
    say(f"done in {results['study_seconds']:.0f} s -> {output_dir}/results.md, results.json, quality.png")


def study(recipe, output_dir, args):
    import torch
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from modeling_brillm.data import sample_tensors
    from modeling_brillm.preparation import count_sample_bigrams

    machine = {"cpu_count": os.cpu_count(), "torch": torch.__version__, "threads": torch.get_num_threads()}
    prepared = prepare(recipe, output_dir)
    tokenizer = AutoTokenizer.from_pretrained(prepared / "tokenizer")
    dataset = load_from_disk(str(prepared / "dataset"))
    vocab_size = len(tokenizer)
    train_split, dev = development_split(dataset["train"], recipe["dev_samples"])
    train_set = sample_tensors(train_split)
    valid = validation_sets(recipe, prepared, dataset, tokenizer)
    primary = next(iter(valid))
    counts, _ = count_sample_bigrams(train_split, vocab_size)
    graph_counts = counts.result()
    results = {
        "recipe": {k: v for k, v in recipe.items()},
        "machine": machine,
        "vocab_size": vocab_size,
        "train_samples": len(train_set["input_ids"]),
        "train_tokens_available": int(train_set["attention_mask"].sum()),
        "validation": {name: {"samples": len(s["input_ids"]), "of": s["total_samples"],
                              "characters": int(s["num_chars"].sum())} for name, s in valid.items()},  # fmt: skip
        "primary": primary,
        "rows": [],
    }
    stores = [output_dir / "runs"] + ([Path(args.records)] if args.records else [])
    for folder in stores:
        folder.mkdir(parents=True, exist_ok=True)

    warm_up(train_set, graph_counts, tokenizer, vocab_size, recipe["seq_len"])

    records = brillm_runs(recipe, args, stores, train_set, dev, valid, primary, graph_counts, tokenizer, vocab_size)
    results["rows"].extend(_row(record) for record in records.values())
    reference = next(run for run in recipe["brillm"] if run["reference"])
    ref_record = records.get(reference["name"])
    if args.skip_gpt2:
        results["gpt2_skipped"] = "--skip-gpt2"
    elif ref_record is not None:  # GPT-2 on the same batches: equal tokens, equal wall-clock, convergence
        record = gpt2_run(recipe, args, stores, reference, ref_record, train_set, dev, valid, primary, vocab_size)
        results["rows"].extend(_gpt2_rows(record))

    # ---- KenLM
    if args.skip_kenlm:
        results["kenlm_skipped"] = "--skip-kenlm"
    else:
        try:
            bin_dir = ensure_kenlm(install=not args.no_install_kenlm)
        except KenLMUnavailable as error:
            results["kenlm_skipped"] = str(error)
            print(f"KENLM SKIPPED: {error}", flush=True)
        else:
            results["rows"].extend(kenlm_rows(recipe, bin_dir, train_set, valid, vocab_size, ref_record, output_dir))
    results["curves"] = {row["name"]: row["curve"] for row in results["rows"] if row.get("curve")}
    return results


def brillm_runs(recipe, args, stores, train_set, dev, valid, primary, graph_counts, tokenizer, vocab_size):
    """Train and evaluate every BriLLM run of the recipe (or reuse its cached record): {name: record}."""
    import torch

    from modeling_brillm.train import top_successors

    fractions = [2.0 ** -k for k in range(recipe["curve_points"] - 1, -1, -1)]
    successors = None
    records = {}
    for run in recipe["brillm"]:
        keeps_seen = bool(run["reference"] and recipe["kenlm"].get("equal_tokens_order"))
        key = _run_key(recipe, {**run, "keeps_seen": keeps_seen})
        if args.only is None or run["name"] not in args.only:
            record = cached_record(stores, run["name"], key)
            if record is not None:
                say(f"{run['name']}: reusing its finished record")
                records[run["name"]] = record
                continue
        if args.only is not None and run["name"] not in args.only:
            say(f"{run['name']}: skipped (--only)")
            continue
        if run["objective"] == "sampled" and successors is None:
            successors = top_successors(train_set["input_ids"], vocab_size, run["num_negatives"] + 1,
                                        train_set["attention_mask"])  # fmt: skip
        model, graph = brillm_model(run, graph_counts, tokenizer, vocab_size, recipe["seed"])
        say(f"{run['name']}: BriLLM d={run['hidden_size']} min_edge_count={run['min_edge_count']} "
            f"objective={run['objective']} positions={run['positions']}: {model.num_parameters():,} parameters")  # fmt: skip
        milestones = [round(f * run["train_tokens"]) for f in fractions] if run["curve"] else [run["train_tokens"]]
        milestones = [] if run["epochs"] else milestones  # an epoch run is evaluated at every epoch end
        positions_before = model.base_model.positions.detach().clone()
        stop, num_steps, epoch_check, dev_history = training_limits(run, recipe, train_set, dev)
        progress = run_progress(stores, run["name"], key, args)
        trained = run_training(run["name"], model, brillm_loss(run, successors), train_set,
                               {**run, "seed": recipe["seed"]}, valid, milestones, recipe["eval_batch_size"], primary,
                               stop=stop, num_steps=num_steps, epoch_check=epoch_check, progress=progress,
                               carry={"development": dev_history} if dev_history is not None else None)  # fmt: skip
        if run["positions"] == "last":
            assert torch.equal(positions_before, model.base_model.positions), "frozen positions changed"
        started = time.perf_counter()
        metrics = {primary: trained["curve"][-1]["metrics"]}  # the last curve point is the end of training
        metrics.update({name: evaluate(model, samples, recipe["eval_batch_size"]) for name, samples in valid.items()
                        if name != primary})  # fmt: skip
        eval_seconds = time.perf_counter() - started
        record = {
            "key": key, "kind": "brillm", "name": run["name"], "groups": run["groups"], "settings": run,
            "parameters": model.num_parameters(), "own_edges": int(graph.num_slots - 1),
            "active_parameters": active_brillm(graph, run["hidden_size"], valid[primary]),
            "train_tokens": trained["tokens"], "steps": trained["steps"], "seconds": trained["seconds"],
            "tokens_per_second": round(trained["tokens"] / max(trained["seconds"], 1e-9), 1),
            "eval_seconds": round(eval_seconds, 1), "metrics": metrics, "curve": trained["curve"],
            "load_average": trained["load_average"], "dev_curve": dev_history, "resumed": trained["resumed"],
            # the sample rows trained on, for KenLM on the same samples (long: only when that KenLM row is asked for)
            "seen": trained["seen"] if keeps_seen else None,
        }  # fmt: skip
        save_record(stores, run["name"], record)
        progress.discard()
        records[run["name"]] = record
        say(f"{run['name']}: " + ", ".join(f"{n} {m['bits_per_char']} bits/char" for n, m in metrics.items()))
        del model
    return records


def gpt2_run(recipe, args, stores, reference, ref_record, train_set, dev, valid, primary, vocab_size):
    """GPT-2 on the reference BriLLM run's batches, in one run (or its cached record): evaluated after the
    reference's tokens, after its training wall-clock and, with ``converge``, where the convergence rule stops it.
    It trains past the reference's tokens and until the rule stops it (with ``equal_tokens: false`` only until the
    rule or its epoch cap stops it), or (without ``converge``) until the reference's wall-clock: a GPT-2 that
    converged sooner has no equal-wall-clock point, its converged one is it."""
    settings = {**recipe["gpt2"]}
    settings["batch_size"] = settings["batch_size"] or reference["batch_size"]
    budget = settings["max_seconds"] or ref_record["seconds"]
    ref_tokens = ref_record["train_tokens"]
    # The default stays out of the key: records made before `equal_tokens` existed keep matching.
    keyed = {k: v for k, v in settings.items() if k != "equal_tokens" or v != GPT2_KEYS[k]}
    key = _run_key(recipe, {**keyed, "budget": budget, "ref_tokens": ref_tokens, "runs": "one"})
    record = cached_record(stores, "gpt2", key)
    if record is not None and not (args.only is not None and "gpt2" in args.only):
        say("gpt2: reusing its finished record")
        return record
    model = gpt2_model(settings, vocab_size, recipe["seq_len"], recipe["seed"])
    short = "" if settings["equal_tokens"] else ", not to equal tokens"
    goal = f"convergence (at most {settings['epochs']} epochs{short})"
    say(f"gpt2: {model.num_parameters():,} parameters; equal tokens {ref_tokens}, equal wall-clock {budget:.0f} s"
        f"{', then to ' + goal if settings['converge'] else ''}")  # fmt: skip
    # The reference's evaluation points (the same batches give the same token counts), then doublings.
    marks = [point["tokens"] for point in ref_record["curve"]] + [ref_tokens * 2**k for k in range(1, 16)]
    # Under a constant learning rate after warm-up the model after N steps of a longer run is the model of a run
    # that stops at N, so one run serves every comparison. run_training refuses a schedule that needs a length.
    converged, epoch_check, history = {}, None, None
    if settings["converge"]:
        _, _, check, history = training_limits(settings, recipe, train_set, dev)

        def epoch_check(epochs_done, model):
            if not converged and check(epochs_done, model):
                converged.update(epoch=epochs_done, metrics=evaluate_all(model, valid, recipe["eval_batch_size"]))
            return False  # the stop below ends the run

    def stop(tokens, seconds):
        if settings["converge"]:
            return bool(converged) and (tokens >= ref_tokens or not settings["equal_tokens"])
        return tokens >= ref_tokens and seconds >= budget

    progress = run_progress(stores, "gpt2", key, args)
    trained = run_training("gpt2", model, gpt2_loss, train_set, {**settings, "seed": recipe["seed"]}, valid, marks,
                           recipe["eval_batch_size"], primary, stop=stop, full_eval_at=[ref_tokens],
                           epoch_check=epoch_check, time_mark=budget, progress=progress,
                           carry={"converged": converged, **({"development": history} if history else {})})  # fmt: skip
    trained.pop("seen")
    record = {"key": key, "settings": settings, "budget": budget, "parameters": model.num_parameters(),
              "trained": trained, "equal_tokens": trained["at_tokens"].get(ref_tokens),
              "equal_time": trained["at_time"], "converged": None}  # fmt: skip
    if converged:
        point = next(p for p in trained["curve"] if p.get("epoch") == converged["epoch"])
        record["converged"] = {"tokens": point["tokens"], "seconds": point["seconds"], "epochs": converged["epoch"],
                               "metrics": converged["metrics"], "dev_curve": history}  # fmt: skip
    save_record(stores, "gpt2", record)
    progress.discard()
    return record


def warm_up(train_set, graph_counts, tokenizer, vocab_size, seq_len, steps=4):
    """A few untimed steps of a throwaway BriLLM and GPT-2: the process's one-time start-up costs (thread pools,
    oneDNN and allocator set-up: several seconds on the first steps) stay out of the first timed run."""
    from modeling_brillm.train import TrainRecipe, build_optimizer, build_scheduler, train_step

    started = time.perf_counter()
    run = {**BRILLM_KEYS, "hidden_size": 4, "min_edge_count": 1}
    brillm, _ = brillm_model(run, graph_counts, tokenizer, vocab_size, seed=0)
    gpt2 = gpt2_model({**GPT2_KEYS, "n_embd": 32, "n_layer": 1, "n_head": 1}, vocab_size, seq_len, seed=0)
    settings = TrainRecipe(learning_rate=1e-3)
    for model, loss_fn in ((brillm, brillm_loss(run, None)), (gpt2, gpt2_loss)):
        optimizer = build_optimizer(model, settings)
        scheduler = build_scheduler(optimizer, settings, steps)
        for step in range(steps):
            rows = slice(step * 16, (step + 1) * 16)
            train_step(model, loss_fn, train_set["input_ids"][rows], train_set["attention_mask"][rows], optimizer, scheduler)
    say(f"warm-up (untimed): {time.perf_counter() - started:.1f} s")


def cached_record(stores, name, key):
    """The finished run ``name``'s record from the first folder of ``stores`` that holds one made with the settings
    ``key``, else `None` (a record made with other settings is ignored)."""
    for folder in stores:
        path = Path(folder) / f"{name}.json"
        if path.is_file():
            record = json.loads(path.read_text())
            if record.get("key") == key:
                return record
    return None


def run_progress(stores, name, key, args):
    """The `RunProgress` of run ``name`` in the output folder's ``runs/`` (never in --records: it holds weights)."""
    minutes = args.checkpoint_minutes
    return RunProgress(Path(stores[0]) / f"{name}.progress", key, None if minutes == 0 else 60.0 * minutes)


def save_record(stores, name, record):
    for folder in stores:
        (Path(folder) / f"{name}.json").write_text(json.dumps(record, separators=(",", ":")) + "\n")


def _run_key(recipe, run):
    material = {k: recipe[k] for k in ("corpus", "tokenizer", "vocab_size", "seq_len", "eval_samples", "validation",
                                       "seed", "curve_points", "dev_samples", "convergence")}  # fmt: skip
    # The texts themselves: a record made on another version of the corpus is not reused (e.g. from --records).
    corpus = Path(recipe["corpus"])
    files = {"train.txt", "valid.txt"} | {source for source in recipe["validation"].values() if source != "prepared"}
    material["sha256"] = {name: _file_digest(corpus / name) for name in sorted(files)}
    return hashlib.sha256(json.dumps([material, run], sort_keys=True, default=str).encode()).hexdigest()[:16]


@functools.cache
def _file_digest(path):
    from modeling_brillm.corpora import sha256_file

    return sha256_file(path)


def _row(record):
    s = record["settings"]
    return {
        "name": record["name"], "kind": "brillm", "groups": record["groups"],
        "description": f"BriLLM d={s['hidden_size']}, min_edge_count={s['min_edge_count']}, {s['objective']} objective, "
                       f"{'learned positional weights' if s['positions'] == 'learned' else 'last energy only'}, "
                       f"lr {s['learning_rate']}, batch {s['batch_size']}",
        "train_tokens": record["train_tokens"], "seconds": record["seconds"],
        "tokens_per_second": record["tokens_per_second"], "parameters": record["parameters"],
        "active_parameters": round(record["active_parameters"]), "own_edges": record["own_edges"],
        "metrics": record["metrics"], "curve": record["curve"], "load_average": record["load_average"],
        "development": record.get("dev_curve"),
    }  # fmt: skip


def _gpt2_rows(record):
    s = record["settings"]
    description = (f"GPT-2 {s['n_layer']} layers, d={s['n_embd']}, {s['n_head']} heads, lr {s['learning_rate']} "
                   f"(warmup {s['warmup_steps']} steps), batch {s['batch_size']}")  # fmt: skip

    def row(name, tokens, seconds, metrics, **extra):
        return {"name": name, "kind": "gpt2", "groups": ["main"], "description": description, "train_tokens": tokens,
                "seconds": seconds, "tokens_per_second": round(tokens / max(seconds, 1e-9), 1),
                "parameters": record["parameters"], "active_parameters": record["parameters"], "metrics": metrics,
                "curve": None, **extra}  # fmt: skip

    rows, trained, converged = [], record["trained"], record["converged"]
    if record["equal_tokens"] is not None:
        equal = record["equal_tokens"]
        rows.append(row("gpt2 (equal tokens)", equal["tokens"], equal["seconds"], equal["metrics"]))
    timed = record["equal_time"]
    if timed is not None:  # the run's curve goes to the row that ended it
        rows.append(row("gpt2 (equal wall-clock)", timed["tokens"], timed["seconds"], timed["metrics"],
                        **({} if converged else {"curve": trained["curve"], "load_average": trained["load_average"]})))
    if converged is not None:
        cap = f"{converged['epochs']}-epoch cap, not converged"
        stop = "to convergence" if converged["dev_curve"]["converged_at"] else cap
        name = f"gpt2 ({stop})" if timed is not None else f"gpt2 ({stop}, within the equal wall-clock)"
        rows.append(row(name, converged["tokens"], converged["seconds"], converged["metrics"],
                        curve=trained["curve"], load_average=trained["load_average"],
                        development=converged["dev_curve"], epochs=converged["epochs"]))  # fmt: skip
    return rows


def kenlm_rows(recipe, bin_dir, train_set, valid, vocab_size, ref_record, output_dir):
    settings = recipe["kenlm"]
    folder = output_dir / "kenlm"
    rows = []
    runs = training_runs(train_set)
    stream_tokens = sum(map(len, runs))
    jobs = [(order, runs, f"KenLM {order}-gram, all training samples", stream_tokens) for order in settings["orders"]]
    if ref_record is not None and settings.get("equal_tokens_order"):
        rows_seen = ref_record["seen"]
        seen_samples = [row[: int(m.sum())] for row, m in
                        zip(train_set["input_ids"][rows_seen].tolist(), train_set["attention_mask"][rows_seen])]  # fmt: skip
        jobs.append((settings["equal_tokens_order"], seen_samples, "KenLM on the reference BriLLM's samples",
                     sum(map(len, seen_samples))))  # fmt: skip
    for index, (order, sentences, description, tokens) in enumerate(jobs):
        equal = index == len(settings["orders"])
        arpa, counts, seconds, seen = train_kenlm(bin_dir, sentences, order, folder, settings["memory"])
        metrics = {name: score_kenlm(bin_dir, arpa, samples, seen, vocab_size) for name, samples in valid.items()}
        arpa.unlink()
        name = f"kenlm-{order}" + (" (equal tokens)" if equal else "")
        say(f"{name}: trained in {seconds:.1f} s; " + ", ".join(f"{n} {m['bits_per_char']} bits/char" for n, m in metrics.items()))
        rows.append({
            "name": name, "kind": "kenlm", "order": order, "groups": ["main"], "description": description,
            "train_tokens": tokens, "seconds": round(seconds, 2), "tokens_per_second": round(tokens / max(seconds, 1e-9), 1),
            "parameters": sum(counts[:-1]) * 2 + counts[-1], "ngrams": counts, "active_parameters": None,
            "metrics": metrics, "curve": None, "equal_tokens": equal,
        })  # fmt: skip
    shutil.rmtree(folder, ignore_errors=True)
    return rows


# ----------------------------------------------------------------------------------------------------------------
# Report


def _fmt_int(value):
    if value is None:
        return "–"
    value = float(value)
    for unit, scale in (("B", 1e9), ("M", 1e6), ("k", 1e3)):
        if abs(value) >= scale:
            return f"{value / scale:.3g} {unit}"
    return f"{value:.0f}"


def results_markdown(results):
    names = list(results["validation"])
    head = ["model", "train tokens", "wall-clock s", "tokens/s", "parameters", "active / token"]
    for name in names:
        head += [f"{name} bits/char", f"{name} ppl/token"]
    lines = []

    def table(rows, title):
        lines.extend([f"### {title}", "", "| " + " | ".join(head) + " |", "|" + " --- |" * len(head)])
        for row in rows:
            cells = [row["name"], _fmt_int(row["train_tokens"]), f"{row['seconds']:.0f}", f"{row['tokens_per_second']:.0f}",
                     _fmt_int(row["parameters"]), _fmt_int(row["active_parameters"])]  # fmt: skip
            for name in names:
                metric = row["metrics"].get(name)
                cells += [f"{metric['bits_per_char']:.3f}", f"{metric['perplexity']:.1f}"] if metric else ["–", "–"]
            lines.append("| " + " | ".join(cells) + " |")
        lines.append("")

    rows = results["rows"]
    titles = {
        "main": "BriLLM, GPT-2 and KenLM",
        "density": "Ablation: graph density (min_edge_count)",
        "positions": "Ablation: positional-weight aggregation vs only the last energy",
        "objective": "Ablation: full-vocabulary vs the reference sampled objective (both evaluated on the full vocabulary)",
    }
    for group, title in titles.items():
        chosen = [row for row in rows if group in row["groups"]]
        if chosen:
            table(chosen, title)
    validation = ", ".join(f"{n}: {v['samples']} of {v['of']} samples ({v['characters']:,} characters)"
                           for n, v in results["validation"].items())  # fmt: skip
    lines.append(f"Scored on evenly spaced validation samples of {results['recipe']['seq_len']} tokens ({validation}); "
                 f"V = {results['vocab_size']} ({results['recipe']['tokenizer']}); {results['train_tokens_available']:,} "
                 f"training tokens available.")  # fmt: skip
    for key, model in (("gpt2_skipped", "GPT-2"), ("kenlm_skipped", "KenLM")):
        if results.get(key):
            lines.append(f"{model} skipped: {results[key]}.")
    lines.append("")
    lines.append("| model | how |")
    lines.append("| --- | --- |")
    for row in rows:
        lines.append(f"| {row['name']} | {row['description']} |")
    return "\n".join(lines) + "\n"


def plot(studies, path):
    """Held-out bits/char against training tokens (log x) of each study in ``studies`` (``results.json`` dicts),
    one panel each on a shared y axis: a language's character and BPE studies side by side are one figure."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, len(studies), figsize=(7 * len(studies), 4.2), dpi=90, sharey=True, squeeze=False)
    for ax, results in zip(axes[0], studies):
        _plot_study(ax, results)
    fig.tight_layout()
    fig.savefig(path)
    plt.close(fig)


def _plot_study(ax, results):
    import matplotlib.pyplot as plt

    primary = results["primary"]
    styles = {"brillm": "-o", "gpt2": "-s"}
    for row in results["rows"]:
        if row.get("curve") and len(row["curve"]) > 1:
            points = [(p["tokens"], p["metrics"]["bits_per_char"]) for p in row["curve"]]
            (line,) = ax.plot(*zip(*points), styles[row["kind"]], label=row["name"], markersize=4)
            converged = (row.get("development") or {}).get("converged_at")
            if converged:  # the epoch end where the development set stopped improving by min_improvement
                point = next(p for p in row["curve"] if p.get("epoch") == converged)
                ax.plot([point["tokens"]], [point["metrics"]["bits_per_char"]], "*", color=line.get_color(),
                        markersize=12, markeredgecolor="black")  # fmt: skip
        elif row["kind"] == "kenlm" and row.get("equal_tokens"):
            ax.plot([row["train_tokens"]], [row["metrics"][primary]["bits_per_char"]], "k*", markersize=8,
                    label=f"{row['name']}")  # fmt: skip
    colours = plt.cm.Greys([0.45, 0.65, 0.85, 1.0])
    kenlm = [row for row in results["rows"] if row["kind"] == "kenlm" and not row.get("equal_tokens")]
    for index, (colour, row) in enumerate(zip(colours, kenlm)):
        value = row["metrics"][primary]["bits_per_char"]
        ax.axhline(value, color=colour, linestyle="--", linewidth=1)
        ax.annotate(f"{row['name']} ({_fmt_int(row['train_tokens'])} tokens)", (0.01 + 0.3 * index, value),
                    xycoords=("axes fraction", "data"), fontsize=7, va="bottom", color=colour)  # fmt: skip
    recipe = results["recipe"]
    ax.set_xscale("log")
    ax.set_xlabel(f"training tokens ({recipe['tokenizer']}, V = {results['vocab_size']})")
    ax.set_ylabel(f"bits/char ({primary})")
    ax.set_title(f"{recipe['name']}: validation bits/char vs training tokens", fontsize=10)
    ax.legend(fontsize=7)
    ax.grid(alpha=0.3)


if __name__ == "__main__":
    main()
