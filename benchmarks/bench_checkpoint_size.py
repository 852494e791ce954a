#!/usr/bin/env python
"""Checkpoint size benchmark: convert, load, generate with and export a BriLLM of the released English shape.

    python benchmarks/bench_checkpoint_size.py [--workdir DIR] [--keep]
        [--vocab vocab_wiki_4k_en.json --tokenizer-json wiki_bpe_tokenizer_4000_bytelevel.json]
        [--vocab-size 4000 --hidden-size 32 --slots 906998]

It writes random reference files of that shape (V=4000, d=32, 906,998 slots: 0.96 B parameters, 3.8 GB in
float32), then runs every step in a process of its own and reports its wall time and peak resident memory
(``VmHWM`` of that process, read from ``/proc/self/status`` as it exits: it includes the memory-mapped file pages
the step touched; ``ru_maxrss`` would also count the parent's pages at fork time), as a multiple of the size of
the checkpoint the step reads. Limits: loading <= 1.3x, converting <= 2.5x. Exits with status 1
when a step exceeds its limit. Needs about 15 GB of free disk in ``--workdir``.
"""

import argparse
import json
import os
import shutil
import subprocess
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
CONVERTER = REPO_ROOT / "conversion" / "convert_official_checkpoint.py"
EXPORTER = REPO_ROOT / "conversion" / "export_official_checkpoint.py"
GB = 1e9

# Runs a script (argv[1], with its arguments) and prints the process's peak resident memory as it exits.
PEAK_REPORTER = """
import atexit, runpy, sys

def report_peak():
    with open("/proc/self/status") as f:
        peak_kb = next(int(line.split()[1]) for line in f if line.startswith("VmHWM:"))
    print(f"peak-rss-kb {peak_kb}", file=sys.stderr, flush=True)

atexit.register(report_peak)
sys.argv = sys.argv[1:]
runpy.run_path(sys.argv[0], run_name="__main__")
"""

# A step script: load a folder (and generate), print what it did as JSON.
LOAD_SCRIPT = """
import json, sys, time
import torch
from modeling_brillm import BriLLMForCausalLM

folder, new_tokens = sys.argv[1], int(sys.argv[2])
start = time.perf_counter()
model = BriLLMForCausalLM.from_pretrained(folder).eval()
loaded = time.perf_counter() - start
result = {"load_s": loaded, "dtype": str(model.model.weights.dtype)}
if new_tokens:
    prompt = torch.tensor([[10, 20, 30, 40, 50, 60, 70, 80]])
    start = time.perf_counter()
    with torch.no_grad():
        output = model.generate(prompt, max_new_tokens=new_tokens, do_sample=False)
    result["generate_s"] = time.perf_counter() - start
    result["generated"] = output[0, prompt.shape[1]:].tolist()
status = dict(line.split(":", 1) for line in open("/proc/self/status"))
result["rss_anon_gb"] = int(status["RssAnon"].split()[0]) * 1024 / 1e9
result["rss_file_gb"] = int(status["RssFile"].split()[0]) * 1024 / 1e9
print(json.dumps(result))
"""


def write_reference_files(folder, vocab_size, hidden_size, num_slots, tokens=None, seed=0):
    """Random reference-format ``model.bin``, ``vocab.json`` and ``word_frequency.json`` of the given shape."""
    rng = np.random.default_rng(seed)
    owned = np.sort(rng.choice(vocab_size * vocab_size, size=num_slots - 1, replace=False))  # row-major edge keys
    generator = torch.Generator().manual_seed(seed)
    state = {
        "positions": torch.ones(1, 512, 1),
        "weights": torch.rand(num_slots, hidden_size, hidden_size, generator=generator) - 0.5,
        "biases": torch.rand(num_slots, 1, hidden_size, generator=generator) - 0.5,
        "node_bias": torch.rand(vocab_size, 1, hidden_size, generator=generator) - 0.5,
    }
    torch.save(state, folder / "model.bin")
    del state
    tokens = tokens or [f"tok{i:05d}" for i in range(vocab_size)]
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    quoted = [json.dumps(token, ensure_ascii=False) for token in tokens]
    sources, targets = np.divmod(owned, vocab_size)
    bounds = np.searchsorted(sources, np.arange(vocab_size + 1))
    with open(folder / "word_frequency.json", "w", encoding="utf-8") as f:
        f.write("{")
        for s in range(vocab_size):
            row_owned = targets[bounds[s] : bounds[s + 1]]
            counts = rng.integers(1, 1000, size=row_owned.size)
            order = np.argsort(-counts, kind="stable")  # descending count, as the reference files
            shared = np.setdiff1d(np.arange(vocab_size), row_owned)
            row = [f"{quoted[t]}: {c}" for t, c in zip(row_owned[order].tolist(), counts[order].tolist())]
            row += [f"{quoted[t]}: 0" for t in shared.tolist()]
            f.write(f"{', ' if s else ''}{quoted[s]}: {{{', '.join(row)}}}")
        f.write("}")
    return folder / "model.bin", folder / "vocab.json", folder / "word_frequency.json"


def measure(script, *args):
    """Run ``python script *args`` in a new process; returns ``(seconds, peak RSS in bytes, stdout)``."""
    env = {**os.environ, "TOKENIZERS_PARALLELISM": "false", "HF_HUB_OFFLINE": "1"}
    command = [sys.executable, "-c", PEAK_REPORTER, str(script), *map(str, args)]
    start = time.perf_counter()
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, env=env)
    seconds = time.perf_counter() - start
    if result.returncode != 0:
        raise RuntimeError(f"{' '.join(command[3:])} failed:\n{result.stderr[-3000:]}")
    peak_kb = int(result.stderr.rsplit("peak-rss-kb ", 1)[1].split()[0])
    return seconds, peak_kb * 1024, result.stdout


def folder_size(path):
    path = Path(path)
    return sum(p.stat().st_size for p in path.iterdir() if p.is_file()) if path.is_dir() else path.stat().st_size


def weight_files(folder):
    return ", ".join(f"{p.name} {p.stat().st_size / GB:.2f} GB" for p in sorted(Path(folder).glob("*.safetensors")))


def main(argv=None):
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    parser.add_argument("--workdir", help="where to write the files (default: a temporary folder)")
    parser.add_argument("--keep", action="store_true", help="keep the files written")
    parser.add_argument("--vocab-size", type=int, default=4000)
    parser.add_argument("--hidden-size", type=int, default=32)
    parser.add_argument("--slots", type=int, default=906_998, help="slots, the shared slot 0 included")
    parser.add_argument("--vocab", help="use this vocabulary's tokens (e.g. the released vocab_wiki_4k_en.json)")
    parser.add_argument("--tokenizer-json", help="tokenizer for the converted folders (needs --vocab)")
    parser.add_argument("--max-shard-size", default="2GB")
    parser.add_argument("--new-tokens", type=int, default=32)
    args = parser.parse_args(argv)

    workdir = Path(args.workdir or tempfile.mkdtemp(prefix="brillm-bench-"))
    workdir.mkdir(parents=True, exist_ok=True)
    tokens = list(json.loads(Path(args.vocab).read_text(encoding="utf-8"))) if args.vocab else None
    vocab_size = len(tokens) if tokens else args.vocab_size
    load_script, import_script = workdir / "load_and_generate.py", workdir / "import_only.py"
    load_script.write_text(LOAD_SCRIPT)
    import_script.write_text("import modeling_brillm\n")
    try:
        start = time.perf_counter()
        checkpoint, vocab, frequencies = write_reference_files(
            workdir, vocab_size, args.hidden_size, args.slots, tokens
        )
        print(
            f"reference files: V={vocab_size} d={args.hidden_size} slots={args.slots:,}: model.bin "
            f"{checkpoint.stat().st_size / GB:.2f} GB, word_frequency.json {frequencies.stat().st_size / GB:.2f} GB "
            f"(written in {time.perf_counter() - start:.0f} s)",
            flush=True,
        )
        extra = ["--tokenizer-json", args.tokenizer_json] if args.tokenizer_json else []
        convert = [CONVERTER, "--checkpoint", checkpoint, "--vocab", vocab, "--frequencies", frequencies]
        convert += ["--max-shard-size", args.max_shard_size, *extra]
        fp32, bf16 = workdir / "converted-fp32", workdir / "converted-bf16"
        generate = f"load float32 + generate {args.new_tokens}"
        steps = [  # name, command, what it reads, limit (x the size read)
            ("python + torch + transformers", [import_script], None, None),
            ("convert float32", [*convert, "--output", fp32], checkpoint, 2.5),
            ("convert bfloat16", [*convert, "--output", bf16, "--dtype", "bfloat16"], checkpoint, 2.5),
            ("load float32", [load_script, fp32, 0], fp32, 1.3),
            ("load bfloat16", [load_script, bf16, 0], bf16, 1.3),
            (generate, [load_script, fp32, args.new_tokens], fp32, 1.3),
            (generate.replace("float32", "bfloat16"), [load_script, bf16, args.new_tokens], bf16, 1.3),
            ("export float32 -> model.bin", [EXPORTER, fp32, "--output", workdir / "exported.bin"], fp32, None),
        ]
        rows, failed = [], False
        for name, command, reads, limit in steps:
            seconds, peak, stdout = measure(*command)
            size = folder_size(reads) if reads is not None else None
            ratio = peak / size if size else None
            ok = limit is None or ratio <= limit
            failed |= not ok
            note = ""
            if stdout.strip().startswith("{"):
                info = json.loads(stdout.strip().splitlines()[-1])
                note = f"anon {info['rss_anon_gb']:.2f} GB, file {info['rss_file_gb']:.2f} GB after"
                if "generate_s" in info:
                    note += f"; {args.new_tokens / info['generate_s']:.1f} tokens/s"
            rows.append((name, seconds, peak, size, ratio, limit, ok, note))
            print(f"  done: {name} ({seconds:.1f} s)", flush=True)

        exported = torch.load(workdir / "exported.bin", mmap=True, weights_only=True)
        original = torch.load(checkpoint, mmap=True, weights_only=True)
        identical = all(torch.equal(exported[k], original[k]) for k in original)

        print()
        print("| step | time (s) | peak RSS (GB) | reads (GB) | peak / read | limit | ok | notes |")
        print("| --- | ---: | ---: | ---: | ---: | ---: | --- | --- |")
        for name, seconds, peak, size, ratio, limit, ok, note in rows:
            size_text = f"{size / GB:.2f}" if size else "-"
            ratio_text = f"{ratio:.2f}x" if ratio else "-"
            limit_text = f"{limit}x" if limit else "-"
            print(
                f"| {name} | {seconds:.1f} | {peak / GB:.2f} | {size_text} | {ratio_text} | {limit_text} | "
                f"{'yes' if ok else 'NO'} | {note} |"
            )
        print()
        print(f"float32 folder:  {weight_files(fp32)}")
        print(f"bfloat16 folder: {weight_files(bf16)}")
        print(f"export of the float32 folder equals the original model.bin tensor for tensor: {identical}")
        return 1 if failed or not identical else 0
    finally:
        if not args.keep and not args.workdir:
            shutil.rmtree(workdir, ignore_errors=True)
        elif not args.keep:  # a given --workdir: remove only what this run wrote
            for name in ("model.bin", "vocab.json", "word_frequency.json", "exported.bin"):
                (workdir / name).unlink(missing_ok=True)
            for path in (load_script, import_script):
                path.unlink(missing_ok=True)
            for name in ("converted-fp32", "converted-bf16"):
                shutil.rmtree(workdir / name, ignore_errors=True)


if __name__ == "__main__":
    sys.exit(main())
