"""Pre-training BriLLM with Accelerate: one script from a laptop CPU to many GPUs.

    brillm train --config configuration/train/tiny-en.yaml [--output-dir D] [--max-steps N] [--resume]
    accelerate launch --config_file configuration/accelerate/multi-gpu.yaml -m modeling_brillm.train --config ...

A recipe (YAML, see ``configuration/train/``) names the prepared data (``brillm prepare`` output: tokenizer,
initialised model, tokenized dataset — prepared on the fly from ``data.corpus`` when missing) and the
optimisation settings. The output directory receives:

* ``checkpoint-<step>/``: the model (``save_pretrained``), tokenizer, Accelerate state (optimizer, scheduler,
  RNG of every process), ``trainer_state.json`` (step, data position, log history) and ``recipe.json`` (the
  recipe it was trained with). Written to a temporary folder and renamed, so ``--resume`` never sees a
  half-written checkpoint; a full disk stops the run with one line naming the folder and the bytes needed, and
  ``train.save_total_limit`` keeps only the newest checkpoints.
* the final model (``model*.safetensors``, config, remote code, tokenizer) directly in the output directory,
  written next to it first and moved in once complete.

Safety of the output directory: a run holds a lock on it (a second run into it stops at once, naming the holder's
pid and host; the kernel drops the lock of a dead process), removes the temporaries a killed run left, refuses to
start afresh over an earlier run unless ``--overwrite-output-dir`` is given (which removes the earlier
checkpoints), and ``--resume`` refuses a recipe that differs from the checkpoint's in anything but the settings
of `RESUMABLE_CHANGES`.

Data order is a pure function of (seed, epoch): every process takes a disjoint shard of one seeded permutation
per epoch, so an interrupted and resumed run replays exactly the batches an uninterrupted run would have seen.
"""

import argparse
import json
import math
import os
import shutil
import time
from dataclasses import asdict, dataclass, field, fields
from functools import partial
from pathlib import Path

import torch
import yaml

from .data import sample_tensors
from .evaluation import character_lengths, evaluate_nll, summarize_nll
from .ngram import ORDERS as NGRAM_ORDERS
from .ngram import KneserNeyLM
from .tokenization_brillm import WholeCharacters
from .hub_brillm import describe_tokenizer, write_model_card
from .output_folders import (
    FolderLock,
    OutputFolderError,
    check_free_space,
    disk_full_message,
    is_disk_full,
    staged_folder,
    tree_bytes,
)

TRAINER_STATE = "trainer_state.json"
RECIPE_STATE = "recipe.json"
# Settings a resumed run may change: they decide how long and how visibly it runs, not what it computes.
RESUMABLE_CHANGES = frozenset(
    {"max_steps", "num_epochs", "save_steps", "eval_steps", "log_steps", "max_eval_batches", "save_total_limit", "report_to",
     "sample_prompt", "sample_tokens", "baseline_order"}
)  # fmt: skip
DEFAULT_MAX_STEPS = 1000  # a recipe giving neither max_steps nor num_epochs
# Schedules whose learning rate does not depend on the run's length: only these may resume with another length.
LENGTH_FREE_SCHEDULES = ("constant", "constant_with_warmup", "inverse_sqrt")


# ----------------------------------------------------------------------------------------------------------------
# Recipes


@dataclass
class DataRecipe:
    """Where the training data comes from."""

    prepared: str | None = None  # a `brillm prepare` output folder; created from `corpus` when missing
    corpus: list[str] = field(default_factory=list)  # text files or folders, used to prepare
    tokenizer: str = "bpe"  # "bpe" or "char"
    vocab_size: int = 1000
    seq_len: int = 32
    min_edge_count: int = 1
    hidden_size: int = 32
    validation_fraction: float = 0.05


@dataclass
class TrainRecipe:
    """Optimisation settings; defaults follow the reference recipe (SPEC §4) where it has one."""

    objective: str = "full"  # "full": exact full-vocabulary CE; "sampled": the reference 1 + k candidates
    num_negatives: int = 400  # k for the sampled objective
    learning_rate: float = 5e-2
    lr_scheduler_type: str = "constant"  # a transformers scheduler name: constant, linear, cosine, ...
    warmup_steps: int = 0  # optimizer steps of linear warm-up (any scheduler but "constant")
    weight_decay: float = 0.0
    batch_size: int = 32  # per process
    gradient_accumulation_steps: int = 1
    max_steps: int | None = None  # optimizer steps; or give num_epochs (neither: DEFAULT_MAX_STEPS)
    num_epochs: float | None = None  # passes over the training set (may be fractional)
    max_grad_norm: float = 0.0  # 0: no clipping
    optimizer: str = "adamw"  # "adamw" (fused), "lazy_adamw" (optimization.LazyAdamW), "sgd"
    sparse_gradients: bool = False  # weights/biases get row-sparse gradients; processes exchange only those rows
    fsdp: bool = False  # shard with FSDP2 (fully_shard) directly, also on CPU processes (gloo)
    save_steps: int = 100
    eval_steps: int = 100
    log_steps: int = 10
    max_eval_batches: int = 50
    seed: int = 0
    mixed_precision: str = "no"  # "no", "bf16", "fp16" (GPU)
    save_total_limit: int | None = None  # keep only this many newest checkpoints (None: all)
    report_to: str = "none"  # "none" or "tensorboard"
    sample_prompt: str | None = None  # generated from after training, printed as `Generated: ...`
    sample_tokens: int = 40
    baseline_order: int = 5  # a Kneser-Ney n-gram of this order on the same samples, reported beside (0: none)


@dataclass
class Recipe:
    name: str
    data: DataRecipe
    train: TrainRecipe
    output_dir: str = "outputs/run"

    @classmethod
    def from_yaml(cls, path):
        """Read a recipe; unknown keys are errors (a typo must not silently fall back to a default)."""
        with open(path, encoding="utf-8") as f:
            raw = yaml.safe_load(f) or {}
        sections = {"data": DataRecipe, "train": TrainRecipe}
        unknown = set(raw) - {"name", "output_dir", *sections}
        if unknown:
            raise ValueError(f"{path}: unknown top-level keys {sorted(unknown)}; expected name, output_dir, data, train.")
        parts = {}
        for key, kind in sections.items():
            values = raw.get(key) or {}
            allowed = {f.name for f in fields(kind)}
            if set(values) - allowed:
                raise ValueError(f"{path}: unknown {key} keys {sorted(set(values) - allowed)}; allowed: {sorted(allowed)}.")
            parts[key] = kind(**{name: _coerce(kind, name, value, path) for name, value in values.items()})
        recipe = cls(name=raw.get("name", Path(path).stem), output_dir=raw.get("output_dir", f"outputs/{Path(path).stem}"), **parts)
        if isinstance(recipe.data.corpus, str):
            recipe.data.corpus = [recipe.data.corpus]
        recipe.check(path)
        return recipe

    def check(self, path="the recipe"):
        """Raise `ValueError` naming ``path`` and the key for a value the run cannot use."""
        settings = self.train
        choices = {"objective": ("full", "sampled"), "mixed_precision": ("no", "bf16", "fp16")}
        choices["report_to"] = ("none", "tensorboard")
        for name, allowed in choices.items():
            if getattr(settings, name) not in allowed:
                raise ValueError(f"{path}: train.{name} must be one of {allowed}; got {getattr(settings, name)!r}.")
        counts = ("batch_size", "gradient_accumulation_steps", "max_steps", "save_steps", "eval_steps", "log_steps",
                  "max_eval_batches", "num_negatives", "save_total_limit")  # fmt: skip
        for name in counts:
            value = getattr(settings, name)
            if value is not None and value < 1:  # 0 would divide by zero later, or never save
                raise ValueError(f"{path}: train.{name} must be at least 1; got {value}.")
        if settings.learning_rate <= 0:
            raise ValueError(f"{path}: train.learning_rate must be positive; got {settings.learning_rate}.")
        if settings.baseline_order != 0 and settings.baseline_order not in NGRAM_ORDERS:
            raise ValueError(f"{path}: train.baseline_order must be 0 (none) or {NGRAM_ORDERS[0]}..{NGRAM_ORDERS[-1]}; "
                             f"got {settings.baseline_order}.")  # fmt: skip
        check_schedule(settings, path)
        check_parallel_settings(settings, path)


# The transformers.get_scheduler names that need no arguments beyond warm-up and length.
SCHEDULERS = ("constant", "constant_with_warmup", "linear", "cosine", "cosine_with_restarts", "polynomial",
              "inverse_sqrt")  # fmt: skip


def check_schedule(settings, origin):
    """Refuse, in one line, a run length or learning-rate schedule the run cannot follow."""
    if settings.max_steps is not None and settings.num_epochs is not None:
        raise ValueError(f"{origin}: give train.max_steps or train.num_epochs, not both.")
    if settings.num_epochs is not None and not settings.num_epochs > 0:
        raise ValueError(f"{origin}: train.num_epochs must be positive; got {settings.num_epochs}.")
    if settings.lr_scheduler_type not in SCHEDULERS:
        raise ValueError(f"{origin}: train.lr_scheduler_type must be one of {', '.join(SCHEDULERS)}; "
                         f"got {settings.lr_scheduler_type!r}.")  # fmt: skip
    if settings.warmup_steps < 0:
        raise ValueError(f"{origin}: train.warmup_steps must be at least 0; got {settings.warmup_steps}.")
    if settings.warmup_steps and settings.lr_scheduler_type == "constant":
        raise ValueError(f"{origin}: train.lr_scheduler_type constant has no warm-up: use constant_with_warmup.")


def total_steps(settings, batches_per_epoch):
    """Optimizer steps of the run: ``max_steps``, or ``num_epochs`` passes of ``batches_per_epoch`` batches (per
    process) with ``gradient_accumulation_steps`` batches per step (rounded up); `DEFAULT_MAX_STEPS` otherwise.

    Example:

    ```python
    >>> total_steps(TrainRecipe(num_epochs=2.5, gradient_accumulation_steps=2), batches_per_epoch=9)
    12
    >>> total_steps(TrainRecipe(), batches_per_epoch=9)
    1000

    ```
    """
    if settings.num_epochs is None:
        return settings.max_steps or DEFAULT_MAX_STEPS
    return max(1, math.ceil(settings.num_epochs * batches_per_epoch / settings.gradient_accumulation_steps))


def build_scheduler(optimizer, settings, num_steps, num_processes=1):
    """The recipe's learning-rate schedule over ``num_steps`` optimizer steps (transformers' `get_scheduler`).

    Accelerate's prepared scheduler advances once per process at every optimizer step (it counts per-process
    batches), so the step counts are scaled by ``num_processes`` when it is to be prepared.
    """
    from transformers import get_scheduler

    return get_scheduler(settings.lr_scheduler_type, optimizer, num_warmup_steps=settings.warmup_steps * num_processes,
                         num_training_steps=num_steps * num_processes)  # fmt: skip


OPTIMIZERS = ("adamw", "lazy_adamw", "sgd")


def check_parallel_settings(settings, origin):
    """Refuse, in one line, an optimizer / sparse-gradient / FSDP combination that cannot train."""
    if settings.optimizer not in OPTIMIZERS:
        choices = ", ".join(OPTIMIZERS)
        raise ValueError(f"{origin}: train.optimizer must be one of {choices}; got {settings.optimizer!r}.")
    for name in ("sparse_gradients", "fsdp"):
        if not isinstance(getattr(settings, name), bool):
            raise ValueError(f"{origin}: train.{name} must be true or false; got {getattr(settings, name)!r}.")
    if settings.sparse_gradients and settings.optimizer == "adamw":
        raise ValueError(f"{origin}: train.optimizer adamw cannot take sparse gradients: use lazy_adamw or sgd.")
    if settings.sparse_gradients and settings.fsdp:
        raise ValueError(f"{origin}: train.sparse_gradients does not work with FSDP (it shards dense gradients).")
    if settings.sparse_gradients and settings.optimizer == "sgd" and settings.weight_decay:
        raise ValueError(f"{origin}: sgd cannot decay weights on sparse gradients: use lazy_adamw or weight_decay 0.")


def _coerce(kind, name, value, path):
    """Recipe values to their field's type: YAML reads ``5e-2`` (no dot) as a string, and ``no``/``yes`` (YAML 1.1
    booleans) as `False`/`True` where a word is meant (``mixed_precision: no``)."""
    expected = {f.name: f.type for f in fields(kind)}[name]
    if expected in (str, "str", str | None) and isinstance(value, bool):
        return "yes" if value else "no"
    for scalar in (int, float):
        if expected in (scalar, scalar.__name__) and not isinstance(value, bool):
            try:
                return scalar(value)
            except (TypeError, ValueError):
                raise ValueError(f"{path}: {kind.__name__} {name} must be a {scalar.__name__}; got {value!r}.") from None
    return value


# ----------------------------------------------------------------------------------------------------------------
# Data order


def epoch_batches(num_samples, batch_size, epoch, seed, rank, world_size):
    """This process's batches (lists of sample indices) for one epoch.

    One seeded permutation per epoch, cut into global batches of ``batch_size * world_size``; process ``rank``
    takes its slice of each, so processes see disjoint samples. Incomplete global batches are dropped.

    Example:

    ```python
    >>> epoch_batches(10, 2, epoch=0, seed=0, rank=0, world_size=2)
    [[4, 1], [3, 9]]
    >>> epoch_batches(10, 2, epoch=0, seed=0, rank=1, world_size=2)
    [[7, 5], [0, 8]]

    ```
    """
    order = torch.randperm(num_samples, generator=torch.Generator().manual_seed(seed * 100_003 + epoch)).tolist()
    global_batch = batch_size * world_size
    usable = num_samples - num_samples % global_batch
    return [
        order[start + rank * batch_size : start + (rank + 1) * batch_size] for start in range(0, usable, global_batch)
    ]


# ----------------------------------------------------------------------------------------------------------------
# Objectives and evaluation


def top_successors(train_ids, vocab_size, k, attention_mask=None):
    """The ``k`` most frequent successors of every node in the training data: (V, k) int64, by descending count
    (ties by node id).

    This is the reference's negative pool (its ``word_frequency.json`` lists successors by descending count).
    """
    ids = train_ids.long()
    pairs = ids[:, :-1] * vocab_size + ids[:, 1:]
    if attention_mask is not None:  # only pairs of real tokens
        pairs = pairs[attention_mask[:, :-1].bool() & attention_mask[:, 1:].bool()]
    pairs = pairs.reshape(-1)
    counts = torch.bincount(pairs, minlength=vocab_size * vocab_size).view(vocab_size, vocab_size)
    # A stable sort breaks ties by node id, so the pool does not depend on the sorting kernel.
    return torch.sort(counts, dim=1, descending=True, stable=True).indices[:, :k]


def sampled_candidates(input_ids, successors, num_negatives):
    """Candidates per edge for the reference objective: the true next token, then the ``num_negatives`` most
    frequent successors of the source other than it: (B, L-1, 1 + num_negatives)."""
    sources, targets = input_ids[:, :-1], input_ids[:, 1:]
    pool = successors[sources]  # (B, L-1, k+1), the true target possibly among them
    keep = pool != targets.unsqueeze(-1)
    # Stable order of the kept entries: sort by (dropped, rank) and take the first num_negatives.
    rank = torch.arange(pool.shape[-1], device=pool.device).expand_as(pool)
    order = torch.argsort(torch.where(keep, rank, rank + pool.shape[-1]), dim=-1)[..., :num_negatives]
    negatives = pool.gather(-1, order)
    return torch.cat([targets.unsqueeze(-1), negatives], dim=-1)


def objective_loss(model, input_ids, attention_mask, objective="full", successors=None, num_negatives=400):
    """The training loss of a batch: ``"full"``, the exact full-vocabulary cross-entropy of every real token;
    ``"sampled"``, the reference's 1 + ``num_negatives`` candidates drawn from ``successors`` (`top_successors`).
    One place for `brillm train`, the quality study and the benchmarks."""
    if objective == "full":
        labels = input_ids.masked_fill(attention_mask == 0, -100)
        return model(input_ids, attention_mask=attention_mask, labels=labels, use_cache=False).loss
    candidates = sampled_candidates(input_ids, successors.to(input_ids.device), num_negatives)
    return getattr(model, "module", model).sampled_loss(input_ids, candidates, attention_mask=attention_mask)


# ----------------------------------------------------------------------------------------------------------------
# Checkpoints


def latest_checkpoint(output_dir):
    """The newest complete ``checkpoint-<step>`` folder (one with a trainer state), or None."""
    candidates = _checkpoints(output_dir)
    return candidates[-1][1] if candidates else None


def _checkpoints(output_dir):
    """``(step, folder)`` of every complete checkpoint, oldest first."""
    candidates = []
    for path in Path(output_dir).glob("checkpoint-*"):
        suffix = path.name[len("checkpoint-") :]
        if suffix.isdigit() and (path / TRAINER_STATE).is_file():
            candidates.append((int(suffix), path))
    return sorted(candidates)


def claim_output_dir(output_dir, resume=False, overwrite=False):
    """Lock ``output_dir`` for this run and make it ready; returns the held `FolderLock`.

    Removes the temporaries of a killed run (``.tmp-*``, partial checkpoints), and refuses (`OutputFolderError`)
    to start afresh over an earlier run (checkpoints or a final model) unless ``resume`` or ``overwrite``;
    ``overwrite`` deletes the earlier checkpoints, so that a later ``--resume`` cannot continue the old run.
    """
    output_dir = Path(output_dir)
    lock = FolderLock(output_dir).acquire()
    try:
        for stale in [*output_dir.glob(".tmp-*"), *output_dir.glob(".checkpoint-*.partial-*")]:
            shutil.rmtree(stale, ignore_errors=True)
        checkpoints = _checkpoints(output_dir)
        earlier = bool(checkpoints) or (output_dir / "config.json").is_file()
        if earlier and not resume and not overwrite:
            raise OutputFolderError(
                f"{output_dir} holds an earlier run ({len(checkpoints)} checkpoints"
                f"{', a final model' if (output_dir / 'config.json').is_file() else ''}): continue it with --resume, "
                "start over with --overwrite-output-dir, or choose another --output-dir."
            )
        if overwrite and not resume:
            for _, checkpoint in checkpoints:
                shutil.rmtree(checkpoint)
    except BaseException:
        lock.release()
        raise
    return lock


def check_resume(recipe, checkpoint, num_processes):
    """Raise `ValueError` naming the first setting in which ``recipe`` differs from the one ``checkpoint`` was
    trained with (those of `RESUMABLE_CHANGES` may change); a checkpoint written before recipes were saved is
    resumed with a warning."""
    path = Path(checkpoint) / RECIPE_STATE
    if not path.is_file():
        print(f"warning: {checkpoint} records no recipe; cannot check that the resumed recipe is the same.")
        return
    saved = json.loads(path.read_text(encoding="utf-8"))
    current = {"data": asdict(recipe.data), "train": asdict(recipe.train), "num_processes": num_processes}
    defaults = {"data": asdict(DataRecipe()), "train": asdict(TrainRecipe())}  # settings older versions lacked
    length_free = recipe.train.lr_scheduler_type in LENGTH_FREE_SCHEDULES
    for section in ("data", "train"):
        for key in sorted(set(saved[section]) | set(current[section])):
            was, now = saved[section].get(key, defaults[section].get(key)), current[section].get(key)
            if was != now and key in ("max_steps", "num_epochs") and not length_free:
                raise ValueError(
                    f"cannot resume from {checkpoint}: train.{key} was {was!r} and is now {now!r}, and the "
                    f"{recipe.train.lr_scheduler_type} learning-rate schedule depends on the run's length."
                )
            if was != now and key not in RESUMABLE_CHANGES:
                raise ValueError(
                    f"cannot resume from {checkpoint}: {section}.{key} was {was!r} and is now {now!r}; only "
                    f"{', '.join(sorted(RESUMABLE_CHANGES))} may change (restore it, or start over with "
                    "--overwrite-output-dir)."
                )
    if saved["num_processes"] != num_processes:
        raise ValueError(
            f"cannot resume from {checkpoint}: it was trained on {saved['num_processes']} processes and this run has "
            f"{num_processes}; the saved data position only holds for the same number."
        )


def rotate_checkpoints(output_dir, limit):
    """Delete the oldest complete checkpoints so that at most ``limit`` remain (``None``: keep all)."""
    if limit is None:
        return
    for _, checkpoint in _checkpoints(output_dir)[:-limit]:
        shutil.rmtree(checkpoint)


def checkpoint_bytes(output_dir, model, optimizer):
    """Bytes a checkpoint needs: the size of the newest one, or, before the first, the weights twice (model and
    Accelerate state) plus the optimizer state."""
    newest = latest_checkpoint(output_dir)
    if newest is not None:
        return tree_bytes(newest)
    tensors = [*model.state_dict().values()] * 2
    tensors += [v for state in optimizer.state_dict()["state"].values() for v in state.values() if torch.is_tensor(v)]
    return sum(t.numel() * t.element_size() for t in tensors) + (1 << 20)


def save_final_model(output_dir, model, weights, tokenizer, save_function):
    """Write the final model next to ``output_dir`` and move its files in once all are written (a failure leaves
    the earlier final model as it was)."""
    output_dir = Path(output_dir)
    staging = output_dir / f".tmp-final-{os.getpid()}"
    shutil.rmtree(staging, ignore_errors=True)
    try:
        model.save_pretrained(staging, state_dict=weights, save_function=save_function)
        tokenizer.save_pretrained(staging)
        for path in staging.iterdir():
            os.replace(path, output_dir / path.name)
    finally:
        shutil.rmtree(staging, ignore_errors=True)


class TrainingDiverged(RuntimeError):
    """The loss became NaN or infinite; the last good checkpoint is kept."""


# ----------------------------------------------------------------------------------------------------------------
# Parallelism: optimizer, DDP / sparse exchange / FSDP2


def refuse_mismatched_launch(accelerator, settings):
    """Stop, in one line, a launch whose running distributed state is not what it asked for (see
    `distributed.launch_mismatch`): Accelerate falls back without a word, and the processes would race."""
    from .distributed import launch_mismatch

    problem = launch_mismatch(accelerator.num_processes, accelerator.distributed_type.value, settings.fsdp)
    if problem is None and settings.sparse_gradients and accelerator.distributed_type.value == "FSDP":
        problem = "train.sparse_gradients does not work with FSDP (it shards dense gradients): use a DDP config."
    if problem:
        raise ValueError(f"refused: {problem}")


def build_optimizer(model, settings):
    """The recipe's optimizer over ``model``'s parameters (after any sharding); sparse gradients set as asked."""
    from .optimization import LazyAdamW

    if hasattr(model, "set_sparse_gradients"):  # BriLLM (the quality study also trains a dense GPT-2 with this)
        model.set_sparse_gradients(settings.sparse_gradients)
    options = {"lr": settings.learning_rate, "weight_decay": settings.weight_decay}
    if settings.optimizer == "lazy_adamw":
        return LazyAdamW(model.parameters(), **options)
    if settings.optimizer == "sgd":
        return torch.optim.SGD(model.parameters(), **options)
    return torch.optim.AdamW(model.parameters(), fused=True, **options)


def prepare_parallel(accelerator, model, settings, make_scheduler):
    """Model, optimizer and scheduler ready for the run's parallelism, and its `GradientFinisher`.

    Dense gradients: Accelerate's DDP (counting what it all-reduces). Sparse gradients: DDP keeps the dense
    parameters, and the finisher exchanges the touched rows of ``weights`` and ``biases``. FSDP: FSDP2 directly.
    """
    from .distributed import GradientTraffic, SparseGradientExchange, count_ddp_traffic, ignore_in_ddp, shard_fully

    traffic, exchange = GradientTraffic(), None
    if settings.fsdp:
        shard_fully(model)  # the layout of configuration/accelerate/fsdp.yaml, resharded after forward
        optimizer = build_optimizer(model, settings)
        scheduler = make_scheduler(optimizer)
        optimizer, scheduler = accelerator.prepare(optimizer, scheduler)
        return model, optimizer, scheduler, GradientFinisher(accelerator, traffic, sharded=True)
    optimizer = build_optimizer(model, settings)
    scheduler = make_scheduler(optimizer)
    distributed = accelerator.num_processes > 1
    if settings.sparse_gradients and distributed:
        sparse = [model.model.weights, model.model.biases]
        ignore_in_ddp(model, sparse)
        exchange = SparseGradientExchange(sparse, traffic=traffic)
    model, optimizer, scheduler = accelerator.prepare(model, optimizer, scheduler)
    if distributed:
        count_ddp_traffic(model, traffic)
    return model, optimizer, scheduler, GradientFinisher(accelerator, traffic, exchange, settings.sparse_gradients)


class GradientFinisher:
    """What happens to the gradients between backward and the optimizer step, and how weights are gathered."""

    def __init__(self, accelerator, traffic, exchange=None, sparse=False, sharded=False):
        self.accelerator, self.traffic, self.exchange = accelerator, traffic, exchange
        self.sparse, self.sharded = sparse, sharded

    def finish(self, model, max_grad_norm):
        """Exchange what DDP did not, then clip (``max_grad_norm`` > 0); once per optimizer step."""
        from .distributed import clip_grad_norm_

        if self.exchange is not None:
            self.exchange.synchronize()
        self.traffic.end_step()
        if max_grad_norm > 0 and self.sparse:  # torch's (and so Accelerate's) clipping refuses sparse gradients
            self.accelerator.unscale_gradients()
            clip_grad_norm_(model.parameters(), max_grad_norm)
        elif max_grad_norm > 0:
            self.accelerator.clip_grad_norm_(model.parameters(), max_grad_norm)

    def state_dict(self, model):
        """The full weights to save (a collective under FSDP: every process takes part)."""
        from .distributed import full_state_dict

        return full_state_dict(model) if self.sharded else self.accelerator.get_state_dict(model)

    def unwrap(self, model):
        """The model to call ``save_pretrained(state_dict=...)`` on. FSDP2 changes a sharded model's class (to
        ``FSDPBriLLMForCausalLM``), which would save torch's FSDP sources as the remote code: a plain model on the
        meta device (no memory) saves the weights it is given, with BriLLM's code."""
        from torch.distributed.fsdp import FSDPModule

        if not self.sharded:
            return self.accelerator.unwrap_model(model)
        plain = next(kind for kind in type(model).__mro__ if not issubclass(kind, FSDPModule))
        with torch.device("meta"):
            return plain(model.config)


# ----------------------------------------------------------------------------------------------------------------
# The training loop


def load_prepared(recipe, accelerator):
    """Model, tokenizer and dataset of the recipe, preparing them from the corpus first if needed."""
    from datasets import load_from_disk
    from transformers import AutoTokenizer

    from .modeling_brillm import BriLLMForCausalLM

    prepared = Path(recipe.data.prepared or Path(recipe.output_dir) / "prepared")
    with accelerator.main_process_first():
        if not (prepared / "model" / "config.json").is_file():
            if not recipe.data.corpus:
                raise FileNotFoundError(f"{prepared} is not a prepared folder and the recipe names no data.corpus.")
            from .preparation import prepare

            prepare(
                recipe.data.corpus,
                prepared,
                tokenizer=recipe.data.tokenizer,
                vocab_size=recipe.data.vocab_size,
                seq_len=recipe.data.seq_len,
                min_edge_count=recipe.data.min_edge_count,
                hidden_size=recipe.data.hidden_size,
                validation_fraction=recipe.data.validation_fraction,
                seed=recipe.train.seed,
            )
    model = BriLLMForCausalLM.from_pretrained(prepared / "model")
    tokenizer = AutoTokenizer.from_pretrained(prepared / "tokenizer")
    dataset = load_from_disk(str(prepared / "dataset"))
    return model, tokenizer, dataset


def train(recipe, resume=False, debug_dir=None, overwrite_output_dir=False):
    """Run a recipe; returns the final evaluation summary (on the main process). The output directory is locked
    for the run (`claim_output_dir`); ``overwrite_output_dir`` allows starting afresh over an earlier run."""
    from accelerate import Accelerator

    recipe.check()
    settings = recipe.train
    output_dir = Path(recipe.output_dir)
    accelerator = Accelerator(
        gradient_accumulation_steps=settings.gradient_accumulation_steps,
        mixed_precision=settings.mixed_precision,
        log_with=None if settings.report_to == "none" else settings.report_to,
        project_dir=str(output_dir),
    )
    refuse_mismatched_launch(accelerator, settings)
    lock = _on_main(accelerator, lambda: claim_output_dir(output_dir, resume, overwrite_output_dir))
    try:
        return TrainingRun(recipe, accelerator, resume, debug_dir).run()
    finally:
        if lock is not None:
            lock.release()


def _on_main(accelerator, function):
    """``function()`` on the main process (its result there, None elsewhere); an error it raises is raised on
    every process, so that none waits forever for the others."""
    from accelerate.utils import broadcast_object_list

    result, failure = None, [None]
    if accelerator.is_main_process:
        try:
            result = function()
        except (ValueError, OSError) as error:
            failure = [error]
    if accelerator.num_processes > 1:
        broadcast_object_list(failure)
    if failure[0] is not None:
        raise failure[0]
    return result


def _main_process_pid(accelerator):
    """The main process's pid, on every process (names this run's shared temporaries)."""
    from accelerate.utils import broadcast_object_list

    return broadcast_object_list([os.getpid()])[0] if accelerator.num_processes > 1 else os.getpid()


def batch_stream(num_samples, batch_size, seed, rank=0, world_size=1, epoch=0, batch_in_epoch=0):
    """This process's batches from a data position on, epoch after epoch, without end: ``(epoch, index, rows,
    ends_epoch)`` in `epoch_batches` order. The one data order of `brillm train` and the quality study.

    Example:

    ```python
    >>> stream = batch_stream(6, 2, seed=0, epoch=0, batch_in_epoch=2)
    >>> [next(stream)[::3] for _ in range(3)]
    [(0, True), (1, False), (1, False)]

    ```
    """
    while True:
        batches = epoch_batches(num_samples, batch_size, epoch, seed, rank, world_size)
        if not batches:
            raise ValueError(
                f"the training set has {num_samples} samples, fewer than one global batch "
                f"({batch_size} x {world_size} processes): lower train.batch_size."
            )
        for index in range(batch_in_epoch, len(batches)):
            yield epoch, index, batches[index], index + 1 == len(batches)
        epoch, batch_in_epoch = epoch + 1, 0


def train_step(model, loss_fn, input_ids, attention_mask, optimizer, scheduler, backward=None, before_update=None):
    """One optimisation step on one batch, the same for `brillm train`, the quality study and the benchmarks.

    ``loss_fn(model, input_ids, attention_mask)`` (e.g. `objective_loss` with its settings bound), its backward
    (``backward(loss)``, e.g. Accelerate's; by default ``loss.backward()``), ``before_update()`` (e.g. exchange and
    clip the gradients), then the optimizer and scheduler steps and ``zero_grad``. Returns the loss, detached: a
    step's graph is freed when the step ends (scoring's `GradientLink` takes its fast path only while no other
    graph of the same weights is alive). A NaN or infinite loss raises `TrainingDiverged` before any update.
    Under Accelerate's gradient accumulation its optimizer, scheduler and ``zero_grad`` skip the batches that
    only accumulate.
    """
    loss = loss_fn(model, input_ids, attention_mask)
    if not torch.isfinite(loss):
        raise TrainingDiverged(f"loss is {loss.item()}")
    if backward is None:
        loss.backward()
    else:
        backward(loss)
    if before_update is not None:
        before_update()
    optimizer.step()
    scheduler.step()
    optimizer.zero_grad(set_to_none=True)
    return loss.detach()


class TrainingRun:
    """This process's part of a `brillm train` run: set-up (data, model, parallelism, resumed state), the loop,
    evaluation, checkpoints and the final model.

    ``state`` (saved as ``trainer_state.json``) holds the data position (``epoch`` being read, ``batch_in_epoch``),
    the optimizer ``step`` and the ``log_history``; with the Accelerate state (optimizer, scheduler, RNGs) it makes a
    resumed run replay exactly what an uninterrupted one does. `train` runs it with the output directory locked:

    ```python
    >>> import tempfile
    >>> from modeling_brillm.preparation import prepare
    >>> folder = Path(tempfile.mkdtemp())
    >>> _ = (folder / "a.txt").write_text("to be or not to be, that is the question.\\n" * 40)
    >>> _ = prepare([folder / "a.txt"], folder / "prepared", vocab_size=300, seq_len=8, hidden_size=4, log=None)
    >>> recipe = Recipe("doc", DataRecipe(prepared=str(folder / "prepared")), TrainRecipe(
    ...     learning_rate=0.05, batch_size=4, num_epochs=2, lr_scheduler_type="linear", warmup_steps=2,
    ...     save_steps=100, eval_steps=100, log_steps=100), output_dir=str(folder / "out"))
    >>> metrics = train(recipe)  # doctest: +ELLIPSIS
    epoch 1 ...
    >>> state = json.loads((latest_checkpoint(folder / "out") / TRAINER_STATE).read_text())
    >>> [(entry["epoch"], entry["step"]) for entry in state["log_history"] if "epoch" in entry]
    [(1, 57), (2, 114)]

    ```
    """

    def __init__(self, recipe, accelerator, resume=False, debug_dir=None):
        from accelerate.utils import set_seed

        self.recipe, self.settings, self.accelerator = recipe, recipe.train, accelerator
        self.output_dir, self.debug_dir = Path(recipe.output_dir), debug_dir
        checkpoint = latest_checkpoint(self.output_dir) if resume else None
        if checkpoint is not None:
            check_resume(recipe, checkpoint, accelerator.num_processes)
        set_seed(self.settings.seed)
        model, self.tokenizer, dataset = load_prepared(recipe, accelerator)
        self.train_set, self.valid_set = sample_tensors(dataset["train"]), sample_tensors(dataset["validation"])
        self.char_lengths = None  # a dataset prepared before samples recorded num_chars: vocabulary lengths
        if "num_chars" not in self.valid_set:
            self.char_lengths = character_lengths(self.tokenizer, model.config.vocab_size)
        self.world, self.rank = accelerator.num_processes, accelerator.process_index
        settings = self.settings
        self.num_steps = total_steps(settings, len(self.train_set["input_ids"]) // (settings.batch_size * self.world))
        successors = None
        if settings.objective == "sampled":
            ids, mask = self.train_set["input_ids"], self.train_set["attention_mask"]
            successors = top_successors(ids, model.config.vocab_size, settings.num_negatives + 1, mask)
        self.loss_fn = partial(objective_loss, objective=settings.objective, successors=successors,
                               num_negatives=settings.num_negatives)  # fmt: skip
        make_scheduler = partial(build_scheduler, settings=settings, num_steps=self.num_steps, num_processes=self.world)
        self.model, self.optimizer, self.scheduler, self.gradients = prepare_parallel(
            accelerator, model, settings, make_scheduler
        )
        if accelerator.is_main_process:
            self.output_dir.mkdir(parents=True, exist_ok=True)
        if settings.report_to != "none":
            accelerator.init_trackers(recipe.name, config={**asdict(recipe.data), **asdict(settings)})
        self.state = {"step": 0, "epoch": 0, "batch_in_epoch": 0, "log_history": []}
        if checkpoint is not None:
            accelerator.load_state(str(checkpoint / "accelerate"))
            self.state = json.loads((checkpoint / TRAINER_STATE).read_text())
            accelerator.print(f"resumed from {checkpoint} at step {self.state['step']}")
        self.run_id = _main_process_pid(accelerator)
        self.seen = [] if debug_dir else None  # samples this process trained on, for the multi-process test
        self.tokens, self.seconds = 0, 0.0

    def run(self):
        """Train to the last step, save the final model, report (on the main process: the final metrics)."""
        from tqdm.auto import tqdm

        state, settings = self.state, self.settings
        self.progress = tqdm(total=self.num_steps, initial=state["step"], desc=self.recipe.name,
                             disable=not self.accelerator.is_local_main_process)  # fmt: skip
        stream = batch_stream(len(self.train_set["input_ids"]), settings.batch_size, settings.seed, self.rank,
                              self.world, state["epoch"], state["batch_in_epoch"])  # fmt: skip
        self.model.train()
        started = time.time()
        while state["step"] < self.num_steps:
            epoch, index, rows, ends_epoch = next(stream)
            loss = self.train_batch(rows)
            state["epoch"], state["batch_in_epoch"] = (epoch + 1, 0) if ends_epoch else (epoch, index + 1)
            synced = self.accelerator.sync_gradients
            self.seconds = time.time() - started
            if synced:
                state["step"] += 1
                self.log_step(loss)
            last = state["step"] == self.num_steps
            if ends_epoch:  # the whole validation set; before the step's checkpoint, which then records it
                self.evaluate(epoch=epoch + 1)
            elif synced and (state["step"] % settings.eval_steps == 0 or last):
                self.evaluate()
            if synced and (state["step"] % settings.save_steps == 0 or last):
                self.save_checkpoint()
        self.progress.close()
        return self.finish()

    def train_batch(self, rows):
        """One batch through `train_step` (an optimizer step once the accumulated batches are complete)."""
        accelerator = self.accelerator
        input_ids = self.train_set["input_ids"][rows].to(accelerator.device)
        mask = self.train_set["attention_mask"][rows].to(accelerator.device)
        if self.seen is not None:
            self.seen.extend(rows)

        def finish_gradients():
            if accelerator.sync_gradients:
                self.gradients.finish(self.model, self.settings.max_grad_norm)

        with accelerator.accumulate(self.model):
            try:
                loss = train_step(self.model, self.loss_fn, input_ids, mask, self.optimizer, self.scheduler,
                                  backward=accelerator.backward, before_update=finish_gradients)  # fmt: skip
            except TrainingDiverged as error:
                raise TrainingDiverged(
                    f"{error} at step {self.state['step']}: training stopped; the last good checkpoint is "
                    f"{latest_checkpoint(self.output_dir)}. Lower train.learning_rate or use mixed_precision 'no'."
                ) from None
        self.tokens += int(mask.sum()) * self.world
        return loss

    def log_step(self, loss):
        step = self.state["step"]
        step_loss = self.accelerator.reduce(loss, reduction="mean").item()
        rate = self.tokens / max(self.seconds, 1e-9)
        self.progress.update(1)
        self.progress.set_postfix(loss=f"{step_loss:.4f}", lr=f"{self.scheduler.get_last_lr()[0]:.2g}", tok_s=f"{rate:.0f}")
        if step % self.settings.log_steps == 0 or step == self.num_steps:
            self.state["log_history"].append({"step": step, "loss": step_loss, "tokens_per_second": rate,
                                              "learning_rate": self.scheduler.get_last_lr()[0],
                                              "gradient_bytes_sent": self.gradients.traffic.last_step})  # fmt: skip
            self.accelerator.print(f"step {step} loss {step_loss:.4f}")
            self.accelerator.log({"train/loss": step_loss, "train/tokens_per_second": rate}, step=step)

    def evaluate(self, epoch=None):
        """Held-out perplexity and bits/char: on the first ``max_eval_batches`` batches of the validation set, or
        at the end of an ``epoch`` on all of it; logged (and recorded in the log history)."""
        limit = None if epoch is not None else self.settings.max_eval_batches * self.settings.batch_size
        metrics = evaluate(self.accelerator, self.model, self.valid_set, self.settings.batch_size, limit, self.char_lengths)
        entry = {"step": self.state["step"], **({"epoch": epoch} if epoch is not None else {})}
        self.state["log_history"].append({**entry, **{f"eval_{k}": v for k, v in metrics.items()}})
        when = f"epoch {epoch} (step {self.state['step']})" if epoch is not None else f"step {self.state['step']}"
        self.accelerator.print(f"{when} eval perplexity {metrics['perplexity']} bits/char {metrics['bits_per_char']}")
        self.accelerator.log({f"eval/{k}": v for k, v in metrics.items() if v is not None}, step=self.state["step"])
        return metrics

    def save_checkpoint(self):
        """``checkpoint-<step>`` (model, tokenizer, Accelerate state, recipe, trainer state), written whole or not
        at all; every process takes part."""
        accelerator, output_dir = self.accelerator, self.output_dir
        accelerator.wait_for_everyone()
        needed = checkpoint_bytes(output_dir, accelerator.unwrap_model(self.model), self.optimizer)
        _on_main(accelerator, lambda: check_free_space(output_dir, needed))
        # Every process writes its own RNG state into a shared temporary folder (named after this run, which holds
        # the folder's lock); the main process finalises.
        tmp_state = output_dir / f".tmp-state-{self.state['step']}-{self.run_id}"
        recipe_state = {"data": asdict(self.recipe.data), "train": asdict(self.settings), "num_processes": self.world}
        try:
            accelerator.save_state(str(tmp_state))
            weights = self.gradients.state_dict(self.model)  # a collective under FSDP: every process takes part
            accelerator.wait_for_everyone()
            if accelerator.is_main_process:
                with staged_folder(output_dir / f"checkpoint-{self.state['step']}") as folder:
                    self.gradients.unwrap(self.model).save_pretrained(folder, state_dict=weights,
                                                                      save_function=accelerator.save)  # fmt: skip
                    self.tokenizer.save_pretrained(folder)
                    os.replace(tmp_state, folder / "accelerate")
                    (folder / RECIPE_STATE).write_text(json.dumps(recipe_state, indent=1))
                    (folder / TRAINER_STATE).write_text(json.dumps(self.state, indent=1))
                rotate_checkpoints(output_dir, self.settings.save_total_limit)
        except Exception as error:  # a failed write raises OSError, RuntimeError (torch) or SafetensorError
            shutil.rmtree(tmp_state, ignore_errors=True)
            if is_disk_full(error):
                raise OutputFolderError(disk_full_message(output_dir, needed)) from None
            raise
        accelerator.wait_for_everyone()

    def finish(self):
        from .distributed import release_reducer

        accelerator = self.accelerator
        accelerator.wait_for_everyone()
        weights = self.gradients.state_dict(self.model)
        if self.seen is not None:
            _write_debug(self.debug_dir, accelerator, self.model, weights, self.seen)
        if accelerator.is_main_process:
            model = self.gradients.unwrap(self.model)
            save_final_model(self.output_dir, model, weights, self.tokenizer, accelerator.save)
        release_reducer(self.model)  # before the process group goes: a hang at exit otherwise
        accelerator.end_training()
        if not accelerator.is_main_process:
            return None
        return _final_report(self)


def _batches(tensors, batch_size, device, rows=slice(None)):
    selected = {name: tensor[rows] for name, tensor in tensors.items()}
    total = len(selected["input_ids"])
    for start in range(0, total, batch_size):
        yield {name: tensor[start : start + batch_size].to(device) for name, tensor in selected.items()}


def evaluate(accelerator, model, valid_set, batch_size, limit=None, char_lengths=None):
    """Full-vocabulary perplexity and bits/char on the first ``limit`` samples (all: `None`) of the validation
    set, the samples spread over the processes and the sums added up (`evaluation.evaluate_nll`)."""
    count = len(valid_set["input_ids"]) if limit is None else min(limit, len(valid_set["input_ids"]))
    count -= count % accelerator.num_processes  # every process runs as many forwards (FSDP gathers in each)
    rows = torch.arange(count)[accelerator.process_index :: accelerator.num_processes]
    batches = _batches(valid_set, batch_size, accelerator.device, rows)
    sums = evaluate_nll(accelerator.unwrap_model(model), batches, char_lengths)
    totals = torch.tensor([sums["nll"], sums["tokens"], sums["characters"]], device=accelerator.device, dtype=torch.float64)
    totals = accelerator.reduce(totals, reduction="sum")
    return summarize_nll(dict(zip(("nll", "tokens", "characters"), totals.tolist())))


def _final_report(run):
    """Reload the saved model the way users will; print and record held-out quality and a sample; write the card."""
    from transformers import AutoModelForCausalLM, AutoTokenizer

    recipe, settings, output_dir = run.recipe, run.settings, run.output_dir
    model = AutoModelForCausalLM.from_pretrained(output_dir, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(output_dir)
    metrics = summarize_nll(evaluate_nll(model, _batches(run.valid_set, 64, "cpu"), run.char_lengths))
    print(
        f"done: {recipe.name} trained {run.tokens} tokens in {run.seconds:.1f} s ({run.tokens / max(run.seconds, 1e-9):.0f} "
        f"tokens/s); held-out perplexity {metrics['perplexity']}, bits/char {metrics['bits_per_char']}; saved to {output_dir}"
    )
    baseline = ngram_baseline(run.train_set, run.valid_set, model.config.vocab_size, settings.baseline_order)
    if baseline is not None:
        print(
            f"baseline: a Kneser-Ney {settings.baseline_order}-gram on the same training samples (fit and scored in "
            f"{baseline.pop('seconds')} s): held-out perplexity {baseline['perplexity']}, bits/char "
            f"{baseline['bits_per_char']}"
        )
    if settings.sample_prompt:
        ids = tokenizer(settings.sample_prompt, return_tensors="pt", add_special_tokens=False).input_ids
        length = ids.shape[1] + settings.sample_tokens
        whole = WholeCharacters.for_tokenizer(tokenizer, max_length=length)  # byte-level BPE: no broken character
        torch.manual_seed(settings.seed)
        out = model.generate(ids, max_length=length, do_sample=True, top_p=0.9,
                             logits_processor=[whole] if whole else None)  # fmt: skip
        print("Generated: " + tokenizer.decode(out[0], skip_special_tokens=True).replace("\n", " "))
    record = {**metrics, **({f"kneser_ney_{settings.baseline_order}gram": baseline} if baseline else {})}
    (output_dir / "eval_results.json").write_text(json.dumps(record, indent=1))
    evaluation = {f"held-out {name}": value for name, value in metrics.items() if value is not None}
    if baseline is not None:
        evaluation[f"held-out bits/char of a Kneser-Ney {settings.baseline_order}-gram on the same samples"] = (
            baseline["bits_per_char"]
        )
    for entry in run.state["log_history"]:
        if "epoch" in entry:
            evaluation[f"held-out bits/char after epoch {entry['epoch']}"] = entry["eval_bits_per_char"]
    length = f"{settings.num_epochs} epochs ({run.num_steps} steps)" if settings.num_epochs else f"{run.num_steps} steps"
    schedule = settings.lr_scheduler_type + (f", {settings.warmup_steps} warm-up steps" if settings.warmup_steps else "")
    tokenizer_description, language = describe_tokenizer(output_dir)
    write_model_card(
        output_dir,
        model.config,
        made_from=(
            f"Pre-trained with `brillm train` (recipe `{recipe.name}`: {settings.objective} objective, {length} of "
            f"{settings.batch_size} x {recipe.data.seq_len} tokens, {settings.optimizer} lr {settings.learning_rate} "
            f"({schedule})) on {', '.join(map(str, recipe.data.corpus)) or recipe.data.prepared}."
        ),
        evaluation=evaluation,
        tokenizer=tokenizer_description,
        language=language,
    )
    return metrics


def ngram_baseline(train_set, valid_set, vocab_size, order):
    """`summarize_nll` of a Kneser-Ney n-gram (`ngram.KneserNeyLM`) fit on the training samples and scored on the
    validation samples as BriLLM is, plus the ``seconds`` it took; `None` when ``order`` is 0 or the samples do
    not record their characters (``num_chars``)."""
    if not order or "num_chars" not in valid_set:
        return None
    started = time.time()
    lm = KneserNeyLM.fit(train_set["input_ids"], train_set["attention_mask"], vocab_size, order)
    sums = lm.score(valid_set["input_ids"], valid_set["attention_mask"])
    result = summarize_nll({**sums, "characters": float(valid_set["num_chars"].sum())})
    return {**result, "seconds": round(time.time() - started, 1)}


def _write_debug(debug_dir, accelerator, model, weights, seen):
    """Per-process record for the multi-process test: the samples seen, a checksum of the (full) weights and how
    many rows of ``weights`` this process holds (all of them unless sharded)."""
    debug_dir = Path(debug_dir)
    debug_dir.mkdir(parents=True, exist_ok=True)
    checksum = sum(float(t.double().sum()) for t in weights.values() if t.is_floating_point())
    record = {
        "rank": accelerator.process_index,
        "num_processes": accelerator.num_processes,
        "distributed_type": str(accelerator.distributed_type),
        "samples": seen,
        "weights_checksum": checksum,
        "local_weight_rows": _local_rows(accelerator.unwrap_model(model).model.weights),
    }
    (debug_dir / f"rank{accelerator.process_index}.json").write_text(json.dumps(record))


def _local_rows(param):
    return (param.to_local() if hasattr(param, "to_local") else param).shape[0]


def build_parser(parser=None):
    parser = parser or argparse.ArgumentParser(prog="brillm train", description="pre-train a BriLLM model")
    parser.add_argument("--config", required=True, help="a recipe YAML, e.g. configuration/train/tiny-en.yaml")
    parser.add_argument("--output-dir", help="overrides the recipe's output_dir")
    parser.add_argument("--max-steps", type=int, help="overrides the length of the recipe (train.max_steps or num_epochs)")
    parser.add_argument("--save-steps", type=int, help="overrides train.save_steps")
    parser.add_argument("--resume", action="store_true", help="continue from the latest checkpoint in the output dir")
    parser.add_argument(
        "--overwrite-output-dir", action="store_true", help="start afresh over an earlier run (its checkpoints are deleted)"
    )
    parser.add_argument("--fsdp", action="store_true", help="shard with FSDP2 directly (sets train.fsdp; CPU too)")
    parser.add_argument("--debug-dir", help=argparse.SUPPRESS)  # per-process records for the multi-process test
    return parser


def run(args):
    recipe = Recipe.from_yaml(args.config)
    if args.output_dir:
        recipe.output_dir = args.output_dir
    if args.max_steps is not None:  # instead of the recipe's length, whether max_steps or num_epochs
        recipe.train.max_steps, recipe.train.num_epochs = args.max_steps, None
    if args.save_steps is not None:
        recipe.train.save_steps = args.save_steps
    if args.fsdp:
        recipe.train.fsdp = True
        check_parallel_settings(recipe.train, "--fsdp")
    if args.resume and recipe.train.fsdp:  # its checkpoints hold no sharded optimizer state yet
        raise ValueError("--resume does not work with --fsdp yet (its checkpoints hold no sharded optimizer state).")
    train(recipe, resume=args.resume, debug_dir=args.debug_dir, overwrite_output_dir=args.overwrite_output_dir)


if __name__ == "__main__":  # `accelerate launch -m modeling_brillm.train`: errors as `brillm train` gives them
    from .cli import run_command

    run_command(run, build_parser())
