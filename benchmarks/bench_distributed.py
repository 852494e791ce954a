#!/usr/bin/env python
"""Distributed training at the released English shape: bytes per step of each mode, tokens/s of each optimizer.

    brillm prepare --corpus data/bundled/en --output /tmp/en4k --tokenizer bpe --vocab-size 4000 --hidden-size 4
    python benchmarks/bench_distributed.py traffic /tmp/en4k     # degree model, touched slots, bytes per step
    python benchmarks/bench_distributed.py speed /tmp/en4k MODE  # MODE: adamw | lazy_adamw | sgd | sgd_sparse
    python benchmarks/bench_distributed.py sharded /tmp/en4k     # source-sharded graph at V = 32,000 / 40,000

The released English graph (V = 4000, d = 32, 906,998 slots) is not bundled. Its out-degrees are modelled from
the bundled corpus: the bigram graph of ``data/bundled/en`` at V = 4000 (108,875 edges) gives each node's
degree, and those degrees are scaled by one factor (capped at V) so that they sum to 906,997 edges. Batches are
real: 32 consecutive 32-token windows of the bundled training set. A batch touches slot 0 and the slab of every
distinct token in it (all positions are scored), so its touched slots are ``1 + sum of degrees``.
"""

import argparse
import json
import os
import time
from pathlib import Path

import numpy as np
import torch

from modeling_brillm import BriLLMConfig, BriLLMForCausalLM
from modeling_brillm.optimization import LazyAdamW

V, D, SLOTS, MAX_POSITIONS = 4000, 32, 906_998, 512
BATCH, LENGTH = 32, 32
GB = 1e9


def measured_degrees(prepared):
    """Out-degree of every node in the bundled corpus's bigram graph, and the token windows: (V,), (N, 32)."""
    from datasets import load_from_disk
    from safetensors.torch import load_file

    row_ptr = load_file(Path(prepared) / "model" / "model.safetensors")["model.graph.row_ptr"]
    windows = torch.tensor(load_from_disk(str(Path(prepared) / "dataset"))["train"]["input_ids"])
    return (row_ptr[1:] - row_ptr[:-1]).double(), windows


def released_degrees(degrees, edges=SLOTS - 1):
    """The measured degrees scaled by one factor, capped at V, to sum to ``edges``: (V,) int64."""
    low, high = 1.0, float(V)
    for _ in range(60):  # bisection on the factor
        factor = (low + high) / 2
        total = (degrees * factor).round().clamp(max=V).sum()
        low, high = (factor, high) if total < edges else (low, factor)
    scaled = (degrees * high).round().clamp(max=V).long()
    scaled[int(scaled.argmax())] -= int(scaled.sum()) - edges  # land exactly on the released count
    return scaled


def zipf_exponent(degrees):
    """Slope of log degree against log rank (ranks 10 .. 2000 of the sorted degrees)."""
    ordered = degrees.sort(descending=True).values.numpy()
    rank = np.arange(1, len(ordered) + 1)
    keep = (rank >= 10) & (rank <= 2000) & (ordered > 0)
    return float(np.polyfit(np.log(rank[keep]), np.log(ordered[keep]), 1)[0])


def batches(windows, count, world=1):
    """``count`` steps of ``world`` real (32, 32) batches each: (count, world, 32, 32)."""
    need = count * world * BATCH
    return windows[:need].view(count, world, BATCH, LENGTH)


def touched(batch, degrees):
    """Slots a batch touches: slot 0 and the slabs of its distinct tokens."""
    return 1 + int(degrees[batch.unique()].sum())


def traffic(args):
    measured, windows = measured_degrees(args.prepared)
    degrees = released_degrees(measured)
    row = (D * D + D) * 4  # bytes of one slot's weight and bias rows
    dense_part = (V * D + MAX_POSITIONS) * 4
    all_gradients = SLOTS * row + dense_part
    result = {
        "measured_edges": int(measured.sum()), "zipf_exponent": zipf_exponent(measured),
        "released_degree_max": int(degrees.max()), "released_degree_median": float(degrees.double().median()),
        "released_nodes_at_V": int((degrees == V).sum()),
        "dense_ddp_payload_gb": all_gradients / GB,
    }  # fmt: skip
    for world in (2, 8):
        steps = batches(windows, 20, world)
        rows = [[touched(steps[s, r], degrees) for r in range(world)] for s in range(len(steps))]
        union = [touched(steps[s].reshape(-1, LENGTH), degrees) for s in range(len(steps))]
        most = [max(r) for r in rows]
        gather = [m * (row + 16) + 16 + dense_part for m in most]  # what each rank hands to the all-gathers
        result[f"W{world}"] = {
            "touched_fraction_mean": float(np.mean(rows)) / SLOTS,
            "touched_fraction_min": min(min(r) for r in rows) / SLOTS,
            "touched_fraction_max": max(most) / SLOTS,
            "union_fraction_mean": float(np.mean(union)) / SLOTS,
            "sparse_payload_gb_mean": float(np.mean(gather)) / GB,
            # ring algorithms: what each rank puts on the wire per step
            "ring_wire_gb": {
                "dense_ddp_all_reduce": 2 * (world - 1) / world * all_gradients / GB,
                "sparse_all_gather": (world - 1) * float(np.mean(gather)) / GB,
                "sparse_union_all_reduce": 2 * (world - 1) / world * (float(np.mean(union)) * row + dense_part) / GB,
                "fsdp_reshard_after_forward": 3 * (world - 1) / world * all_gradients / GB,
                "fsdp_keep_gathered": 2 * (world - 1) / world * all_gradients / GB,
            },
        }
    print(json.dumps(result, indent=1))


def speed(args):
    """Tokens/s of one optimizer mode on one process at the released shape (timed after a warm-up step)."""
    measured, windows = measured_degrees(args.prepared)
    degrees = released_degrees(measured)
    generator = torch.Generator().manual_seed(0)
    col_idx = torch.cat([torch.randperm(V, generator=generator)[:k].sort().values for k in degrees.tolist()]).int()
    row_ptr = torch.cat([torch.zeros(1, dtype=torch.long), degrees.cumsum(0)])
    torch.manual_seed(0)
    config = BriLLMConfig(vocab_size=V, hidden_size=D, num_slots=SLOTS)
    model = BriLLMForCausalLM.from_graph(config, row_ptr, col_idx)
    sparse = args.mode in ("lazy_adamw", "sgd_sparse")
    model.set_sparse_gradients(sparse)
    if args.mode == "adamw":
        optimizer = torch.optim.AdamW(model.parameters(), lr=1e-3, fused=True)
    elif args.mode == "lazy_adamw":
        optimizer = LazyAdamW(model.parameters(), lr=1e-3, weight_decay=0.0)
    else:
        optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)
    steps = batches(windows, args.steps + 1)
    times = []
    for step in range(args.steps + 1):
        ids = steps[step, 0]
        start = time.perf_counter()
        model(ids, labels=ids, use_cache=False).loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - start)
    status = dict(line.split(":", 1) for line in open("/proc/self/status"))
    timed = times[1:]
    print(json.dumps({
        "mode": args.mode, "step_ms": [round(t * 1000) for t in timed],
        "tokens_per_s_median": round(BATCH * LENGTH / float(np.median(timed))),
        "peak_rss_gb": int(status["VmHWM"].split()[0]) * 1024 / GB, "threads": torch.get_num_threads(),
    }))  # fmt: skip


def sharded(args):
    """Per-step volume of a source-sharded graph (design arithmetic, see README "Scaling out")."""
    measured, windows = measured_degrees(args.prepared)
    exponent = zipf_exponent(measured)
    positions_per_step = BATCH * LENGTH  # scored positions of one rank per step
    out = {"zipf_exponent": exponent}
    tokens = windows[: 200 * BATCH].reshape(-1)
    frequency = torch.bincount(tokens, minlength=V).double().sort(descending=True).values
    for vocab in (32_000, 40_000):
        rank = torch.arange(1, vocab + 1, dtype=torch.float64)
        # degree(r) = A r^exponent (measured slope), A such that the mean degree is the released graph's share of V.
        shape = rank**exponent
        degree = (shape * (((SLOTS - 1) / V / V) * vocab * vocab / shape.sum())).clamp(max=vocab)
        # token frequency: Zipf with the measured slope of the bundled corpus's unigram counts
        keep = frequency > 0
        slope = float(np.polyfit(np.log(np.arange(1, int(keep.sum()) + 1)), np.log(frequency[keep].numpy()), 1)[0])
        share = rank**slope / (rank**slope).sum()  # probability that a position's source has rank r
        work = share * degree  # expected scoring work per position at each source
        slots = float(degree.sum()) + 1
        entry = {"slots": slots, "parameters_gb_fp32": slots * (D * D + D) * 4 / GB, "frequency_slope": slope}
        for world in (8, 64):
            hottest = float(work.max() / work.sum())  # the most loaded source's share of all scoring work
            per_position = {
                "signal_and_ids_to_owner": D * 4 + 16, "loss_stats_back": 8, "signal_grad_back": D * 4,
                "true_edge_rows_and_grads": 2 * (D * D + D) * 4,
            }  # fmt: skip
            entry[f"W{world}"] = {
                "bytes_per_position": per_position,
                "mb_per_rank_per_step": positions_per_step * sum(per_position.values()) / 1e6,
                "mb_without_true_edge_rows": positions_per_step * (D * 4 + 16 + 8 + D * 4) / 1e6,
                "hottest_source_share_of_work": hottest,
                "hot_sources_to_split": int((work / work.sum() > 1 / world).sum()),
                "dense_ddp_gb_per_rank_per_step": 2 * (world - 1) / world * slots * (D * D + D) * 4 / GB,
            }
        out[f"V{vocab}"] = entry
    print(json.dumps(out, indent=1))


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("command", choices=("traffic", "speed", "sharded"))
    parser.add_argument("prepared", help="a `brillm prepare` folder of data/bundled/en at V = 4000")
    parser.add_argument("mode", nargs="?", default="adamw", choices=("adamw", "lazy_adamw", "sgd", "sgd_sparse"))
    parser.add_argument("--steps", type=int, default=3)
    args = parser.parse_args()
    {"traffic": traffic, "speed": speed, "sharded": sharded}[args.command](args)


if __name__ == "__main__":
    os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")
    main()
