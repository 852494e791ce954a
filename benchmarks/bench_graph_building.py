"""Graph-building speed: bigram counting and CSR building at V = 4000 on ~50 MB of text, and V = 32,000 (sparse).

    python benchmarks/bench_graph_building.py [--corpus data/bundled/en/train.txt] [--megabytes 50]

The text is the corpus's lines shuffled and repeated up to the requested size. It is tokenized with a byte-level
BPE of 4000 tokens trained on the corpus (``tokenizers``' own threads), then counted by `BigramCounter` in
batches of one million tokens, as ``brillm prepare`` does. V = 32,000 ids are drawn from a Zipf law (a dense count
matrix would take 8.2 GB, so the counter stays sparse). Prints a Markdown table.
"""

import argparse
import resource
import time
from pathlib import Path

import numpy as np

from modeling_brillm.graph_building import BigramCounter, build_graph, graph_statistics
from modeling_brillm.tokenization_brillm import train_bpe_tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent


def synthesise(corpus, megabytes, seed=0):
    lines = Path(corpus).read_text(encoding="utf-8").splitlines(keepends=True)
    rng = np.random.default_rng(seed)
    out, size = [], 0
    while size < megabytes * 1_000_000:
        for index in rng.permutation(len(lines)):
            out.append(lines[index])
            size += len(lines[index])
    return out


def count(batches, vocab_size):
    counter = BigramCounter(vocab_size)
    for ids in batches:
        counter.update(ids)
    return counter


def peak_rss_gb():
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1e6


def main():
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--corpus", default=str(REPO_ROOT / "data" / "bundled" / "en" / "train.txt"))
    parser.add_argument("--megabytes", type=float, default=50)
    args = parser.parse_args()

    rows = []
    lines = synthesise(args.corpus, args.megabytes)
    characters = sum(map(len, lines))
    started = time.perf_counter()
    tokenizer = train_bpe_tokenizer(
        iter(Path(args.corpus).read_text(encoding="utf-8").splitlines(keepends=True)), vocab_size=4000
    )
    rows.append(("train BPE tokenizer (corpus)", 4000, "-", time.perf_counter() - started))

    started = time.perf_counter()
    backend = tokenizer.backend_tokenizer
    batches, pending = [], []
    for first in range(0, len(lines), 8192):
        for encoding in backend.encode_batch_fast(lines[first : first + 8192], add_special_tokens=False):
            pending.extend(encoding.ids)
        if len(pending) >= 1 << 20:
            batches.append(np.asarray(pending, dtype=np.int32))
            pending = []
    batches.append(np.asarray(pending, dtype=np.int32))
    tokens = sum(map(len, batches))
    rows.append((f"tokenize {characters / 1e6:.0f} M characters", 4000, tokens, time.perf_counter() - started))

    started = time.perf_counter()
    graph = build_graph(count(batches, 4000))
    rows.append(("count bigrams + build CSR (dense)", 4000, tokens, time.perf_counter() - started))
    stats_4000 = graph_statistics(graph)

    rng = np.random.default_rng(0)
    wide = [np.minimum(rng.zipf(1.2, size=len(ids)) - 1, 31_999).astype(np.int32) for ids in batches]
    started = time.perf_counter()
    counter = count(wide, 32_000)
    wide_graph = build_graph(counter)
    rows.append(("count bigrams + build CSR (sparse)", 32_000, tokens, time.perf_counter() - started))
    assert not counter.is_dense

    print("| stage | V | tokens | seconds | M tokens/s |")
    print("| --- | ---: | ---: | ---: | ---: |")
    for stage, vocab, n, seconds in rows:
        rate = f"{n / seconds / 1e6:.1f}" if isinstance(n, int) else "-"
        print(f"| {stage} | {vocab:,} | {n if isinstance(n, str) else f'{n:,}'} | {seconds:.2f} | {rate} |")
    print()
    print(
        f"V=4000: {stats_4000['num_own_edges']:,} own edges, {stats_4000['num_parameters']:,} parameters at d=32; "
        f"V=32000: {wide_graph.num_own_edges:,} own edges; peak RSS {peak_rss_gb():.2f} GB"
    )


if __name__ == "__main__":
    main()
