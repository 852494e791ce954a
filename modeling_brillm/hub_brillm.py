"""Model cards and Hub publishing for BriLLM checkpoint folders.

Used by the tools that write checkpoints (``brillm prepare``/``train``/``push``, the converter); the model code
does not import it, so checkpoints do not carry it.
"""

import json
import tempfile
from pathlib import Path

from huggingface_hub import CommitOperationAdd, HfApi, ModelCard, ModelCardData, get_token

from .configuration_brillm import count_parameters

CARD_TAGS = ["brillm", "custom_code"]
EXAMPLE_PROMPTS = {"en": "In frogs, the hind legs are larger", "zh": "《罗马》描述了"}


def parameter_counts(config):
    """Parameter counts of a BriLLM ``config`` (a `BriLLMConfig` or the dict of its ``config.json``).

    Returns ``{"total", "slots", "own_edges", "possible_edges"}``: every slot holds a ``d x d`` matrix and a bias,
    every node a bias, plus one positional logit per learned position.

    Example:

    ```python
    >>> counts = parameter_counts({"vocab_size": 4000, "hidden_size": 32, "num_slots": 906998,
    ...                            "max_position_embeddings": 512})
    >>> counts["total"], counts["own_edges"]
    (957918400, 906997)

    ```
    """
    V, d, P, num_positions = (
        _field(config, name) for name in ("vocab_size", "hidden_size", "num_slots", "max_position_embeddings")
    )
    return {
        "total": count_parameters(V, d, P, num_positions),
        "slots": P,
        "own_edges": P - 1,
        "possible_edges": V * V,
    }


def model_card(
    config,
    *,
    repo_id=None,
    made_from=None,
    language=None,
    license="unknown",
    datasets=None,
    evaluation=None,
    tokenizer=None,
    tags=(),
):
    """The ``README.md`` card of a BriLLM checkpoint (a `huggingface_hub.ModelCard`).

    Args:
        config: `BriLLMConfig` or the dict of its ``config.json``.
        repo_id: where the checkpoint lives, used in the usage snippet (a placeholder when unknown).
        made_from: Markdown saying how the checkpoint was made (converted from which files, trained on what with
            which recipe).
        language: ISO code(s) of the text it was trained on, e.g. ``"en"``.
        license: licence identifier for the card metadata (``"unknown"`` unless you know it).
        datasets: Hub dataset id(s) it was trained on.
        evaluation: ``{metric: value}`` of known evaluation numbers.
        tokenizer: one line describing the tokenizer shipped with the weights, `None` when there is none.
        tags: tags added to ``brillm`` and ``custom_code``.

    Example:

    ```python
    >>> card = model_card({"vocab_size": 64, "hidden_size": 8, "num_slots": 1668, "max_position_embeddings": 512},
    ...                   language="en", evaluation={"perplexity": 41.5})
    >>> card.data.library_name, card.data.pipeline_tag, card.data.tags
    ('transformers', 'text-generation', ['brillm', 'custom_code'])
    >>> "| perplexity | 41.5 |" in card.text and "trust_remote_code=True" in card.text
    True

    ```
    """
    counts = parameter_counts(config)
    V, d, positions = (_field(config, name) for name in ("vocab_size", "hidden_size", "max_position_embeddings"))
    dtype = str(_field(config, "dtype", None) or _field(config, "torch_dtype", None) or "float32")
    dtype = dtype.removeprefix("torch.")
    data = ModelCardData(
        language=language,
        license=license,
        library_name="transformers",
        pipeline_tag="text-generation",
        tags=CARD_TAGS + [tag for tag in tags if tag not in CARD_TAGS],
        datasets=datasets,
    )
    repo = repo_id or "path/to/this/folder"
    languages = [language] if isinstance(language, str) else list(language or [])
    prompt = EXAMPLE_PROMPTS.get(languages[0] if languages else "en", EXAMPLE_PROMPTS["en"])
    if tokenizer is not None:
        usage = (
            f'tokenizer = AutoTokenizer.from_pretrained("{repo}", trust_remote_code=True)\n'
            f'inputs = tokenizer("{prompt}", return_tensors="pt", add_special_tokens=False)\n'
            "output = model.generate(**inputs, max_new_tokens=32, do_sample=False)\n"
            "print(tokenizer.decode(output[0], skip_special_tokens=True))"
        )
    else:
        usage = (
            "# This folder has no tokenizer: give token ids of its vocabulary.\n"
            "output = model.generate(torch.tensor([[17, 61, 61]]), max_new_tokens=32, do_sample=False)"
        )
    if evaluation:
        scores = "| metric | value |\n| --- | --- |\n" + "".join(f"| {k} | {v} |\n" for k, v in evaluation.items())
    else:
        scores = "No evaluation numbers are recorded for this checkpoint.\n"
    density = 100 * counts["own_edges"] / counts["possible_edges"]
    slots = (
        f"{counts['slots']:,} (1 shared + {counts['own_edges']:,} owned edges, {density:.2f} % of "
        f"{counts['possible_edges']:,})"
    )
    fidelity = (
        f"position_shift={_field(config, 'position_shift', 1)}, "
        f"suppress_self_loop={_field(config, 'suppress_self_loop', False)}"
    )
    body = f"""
# BriLLM ({_short_count(counts['total'])} parameters)

A BriLLM graph language model ([arXiv 2503.11299](https://arxiv.org/abs/2503.11299)): every token is a node, every
directed edge an affine map `GELU(x W + b + PE)`, and the next token is the node whose edge lets the most energy
through. Edges that own no slot share slot 0.

| | |
| --- | --- |
| parameters | {counts['total']:,} |
| edge slots | {slots} |
| vocabulary | {V:,} nodes |
| tokenizer | {tokenizer or 'none (token ids only)'} |
| node width | {d} |
| learned positions | {positions} (longer texts reuse the last one) |
| weights | {dtype} |
| decoding | {fidelity} |

## How it was made

{made_from or 'Saved with `save_pretrained`; no provenance was recorded.'}

## Usage

The modeling code ships with the weights, so `trust_remote_code=True` is all it needs (where the `brillm`
package is installed, `import modeling_brillm` registers the same classes natively).

```python
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer

model = AutoModelForCausalLM.from_pretrained("{repo}", trust_remote_code=True)
{usage}
```

## Evaluation

{scores}"""
    return ModelCard(f"---\n{data.to_yaml()}\n---\n{body}")


def write_model_card(save_directory, config, overwrite=True, **fields):
    """Write ``README.md`` (see `model_card` for ``fields``) into a checkpoint folder; returns its path.

    The tokenizer line and the language default to what the folder's ``tokenizer.json`` says, if it has one.
    With ``overwrite=False`` an existing card is kept.

    Example:

    ```python
    >>> import tempfile
    >>> from huggingface_hub import ModelCard
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     path = write_model_card(folder, {"vocab_size": 8, "hidden_size": 4, "num_slots": 65,
    ...                                      "max_position_embeddings": 16}, made_from="A unit test.")
    ...     ModelCard.load(path).data.tags
    ['brillm', 'custom_code']

    ```
    """
    path = Path(save_directory) / "README.md"
    if path.exists() and not overwrite:
        return path
    described, guessed = describe_tokenizer(save_directory)
    if fields.get("tokenizer") is None:
        fields["tokenizer"] = described
    if fields.get("language") is None:
        fields["language"] = guessed
    model_card(config, **fields).save(path)
    return path


def describe_tokenizer(folder):
    """``(one-line description, language guess)`` of the ``tokenizer.json`` in ``folder``; ``(None, None)`` if none.

    Example:

    ```python
    >>> describe_tokenizer("/nonexistent")
    (None, None)

    ```
    """
    path = Path(folder) / "tokenizer.json"
    if not path.is_file():
        return None, None
    tokenizer = json.loads(path.read_text(encoding="utf-8"))
    vocab = tokenizer["model"].get("vocab", {})
    kind = tokenizer["model"].get("type")
    if kind == "BPE":
        description = f"byte-level BPE, {len(vocab):,} tokens (`tokenizer.json`)"
    elif kind == "WordLevel":
        description = f"one token per character, {len(vocab):,} tokens, unknown characters -> `<unk>` (`tokenizer.json`)"
        if tokenizer.get("normalizer"):
            description += "; full-width punctuation folded to half width"
    else:
        description = f"{kind}, {len(vocab):,} tokens (`tokenizer.json`)"
    cjk = sum(any("\u4e00" <= char <= "\u9fff" for char in token) for token in vocab)
    latin = sum(any(char.isascii() and char.isalpha() for char in token) for token in vocab)
    language = "zh" if cjk > len(vocab) / 4 else "en" if latin > len(vocab) / 4 else None
    return description, language


# ----------------------------------------------------------------------------------------------------------------
# Publishing


class PushError(RuntimeError):
    """A checkpoint folder could not be published; the message says why, in one line.

    Example:

    ```python
    >>> try:
    ...     push_folder("/nonexistent", "me/brillm")
    ... except PushError as error:
    ...     print(error)
    /nonexistent is not a checkpoint folder: it has no config.json.

    ```
    """


def checkpoint_files(folder):
    """The files of a BriLLM checkpoint folder that `push_folder` uploads (sorted); raises `PushError` if unusable.

    All top-level files but hidden ones are uploaded. The folder must hold a BriLLM ``config.json``, its weights
    (``model.safetensors``, or an index and every shard it lists) and the remote code its ``auto_map`` names.

    Example:

    ```python
    >>> import tempfile
    >>> from modeling_brillm import BriLLMConfig, BriLLMForCausalLM
    >>> with tempfile.TemporaryDirectory() as folder:
    ...     BriLLMForCausalLM(BriLLMConfig(vocab_size=8, hidden_size=4)).save_pretrained(folder)
    ...     [path.name for path in checkpoint_files(folder)]  # doctest: +NORMALIZE_WHITESPACE
    ['config.json', 'configuration_brillm.py', 'generation_config.json', 'graph_brillm.py', 'kernels_brillm.py',
     'model.safetensors', 'modeling_brillm.py', 'scoring_brillm.py', 'signal_brillm.py']

    ```
    """
    folder = Path(folder)
    config_path = folder / "config.json"
    if not config_path.is_file():
        raise PushError(f"{folder} is not a checkpoint folder: it has no config.json.")
    config = json.loads(config_path.read_text(encoding="utf-8"))
    if config.get("model_type") != "brillm":
        raise PushError(f"{config_path} has model_type {config.get('model_type')!r}, not 'brillm'.")
    names = {path.name for path in folder.iterdir() if path.is_file() and not path.name.startswith(".")}
    index = folder / "model.safetensors.index.json"
    if index.is_file():
        shards = set(json.loads(index.read_text(encoding="utf-8"))["weight_map"].values())
        missing = sorted(shards - names)
    else:
        missing = [] if "model.safetensors" in names else ["model.safetensors"]
    missing += sorted({f"{entry.split('.')[0]}.py" for entry in config.get("auto_map", {}).values()} - names)
    if missing:
        raise PushError(f"{folder} is incomplete: {', '.join(missing)} missing.")
    return sorted(folder / name for name in names)


def push_folder(
    folder,
    repo_id,
    *,
    private=None,
    revision=None,
    token=None,
    commit_message=None,
    commit_description=None,
    create_pr=False,
):
    """Upload a checkpoint folder (weights, code, tokenizer, card) to the Hub in one commit; returns its URL.

    The repository (and the branch ``revision``) is created when missing. A folder without ``README.md`` gets
    a card made from its config, uploaded without writing it into the folder: the local folder is never changed.
    Any failure (no token, network, refused by the Hub) raises `PushError` with a one-line reason.

    Example (``tests/test_publish.py`` runs it against a local stand-in of the Hub):

    ```python
    >>> try:
    ...     push_folder("/nonexistent", "me/brillm", private=True)
    ... except PushError as error:
    ...     print(error)
    /nonexistent is not a checkpoint folder: it has no config.json.

    ```
    """
    folder = Path(folder)
    files = checkpoint_files(folder)
    token = token or get_token()
    if not token:
        raise PushError("no Hugging Face token: log in with `hf auth login`, set HF_TOKEN or pass a token.")
    api = HfApi(token=token)
    try:
        repo_id = api.create_repo(repo_id, private=private, exist_ok=True).repo_id  # with its namespace now
        operations = [CommitOperationAdd(path_in_repo=path.name, path_or_fileobj=str(path)) for path in files]
        if not (folder / "README.md").is_file():
            config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
            description, language = describe_tokenizer(folder)
            card = model_card(config, repo_id=repo_id, tokenizer=description, language=language)
            operations.append(CommitOperationAdd(path_in_repo="README.md", path_or_fileobj=str(card).encode()))
        if revision not in (None, "main"):
            api.create_branch(repo_id, branch=revision, exist_ok=True)
        commit = api.create_commit(
            repo_id,
            operations,
            commit_message=commit_message or f"Upload BriLLM checkpoint {folder.name}",
            commit_description=commit_description,
            revision=revision,
            create_pr=create_pr,
        )
    except Exception as error:  # every failure of the Hub client (HTTP, network, offline mode) ends here
        reason = (str(error).strip().splitlines() or [""])[0]
        raise PushError(f"could not push {folder} to {repo_id}: {type(error).__name__}: {reason}") from error
    return commit.pr_url or commit.commit_url


def push_model(model, repo_id, *, max_shard_size="50GB", tags=(), **hub_kwargs):
    """Save ``model`` (a BriLLM model) with a model card to a temporary folder and upload it in one commit, as
    `push_folder` does (which takes ``hub_kwargs``); returns the commit URL."""
    with tempfile.TemporaryDirectory() as folder:
        model.save_pretrained(folder, max_shard_size=max_shard_size)
        write_model_card(folder, model.config, repo_id=repo_id, tags=list(tags or ()))
        return push_folder(folder, repo_id, **hub_kwargs)


def _short_count(n):
    return f"{n / 1e9:.2f} B" if n >= 1e8 else f"{n / 1e6:.1f} M" if n >= 1e5 else f"{n:,}"


_REQUIRED = object()


def _field(config, name, default=_REQUIRED):
    value = config.get(name, default) if isinstance(config, dict) else getattr(config, name, default)
    if value is _REQUIRED:
        raise KeyError(f"the config has no {name!r}")
    return value


__all__ = [
    "PushError",
    "checkpoint_files",
    "describe_tokenizer",
    "model_card",
    "parameter_counts",
    "push_folder",
    "push_model",
    "write_model_card",
]
