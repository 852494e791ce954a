#!/usr/bin/env python
"""GPU readiness: kernels against PyTorch on the device, then throughput at the released English shape (issue 16).

    python benchmarks/bench_gpu.py [--json gpu.json]
    TRITON_INTERPRET=1 python benchmarks/bench_gpu.py --smoke   # every code path at a tiny shape, on the CPU

On a CUDA machine (at most about 5 minutes):

1. checks one training step (loss and the gradients of all four parameters) and eval logits with
   ``BRILLM_KERNELS=triton`` against ``=torch`` on a small random graph, on the GPU;
2. builds a random model of the released English shape (V = 4000, 906,998 slots, d = 32, Zipf-like out-degrees)
   and prints tokens/s for a training step (forward + backward + SGD on sparse gradients; float32 weights and bf16
   weights), eval (exact full-vocabulary logits, no grad) and greedy ``generate`` at batch 1 and 32, with the slab
   bytes each reads and the achieved fraction of the device's copy bandwidth (measured here, a large
   device-to-device copy);
3. with more than one visible GPU, runs the training step on all of them (``torchrun``, one process per GPU,
   data parallel with the sparse gradients summed by ``all_reduce``) and prints the total tokens/s.

Without CUDA it says so and exits 0.
"""

import argparse
import json
import os
import subprocess
import sys
import time
from pathlib import Path

import torch

from modeling_brillm import BriLLMConfig, BriLLMForCausalLM

ENGLISH = {"vocab_size": 4000, "num_slots": 906_998, "hidden_size": 32}
SMOKE = {"vocab_size": 24, "num_slots": 1 + 24 * 6, "hidden_size": 16}


def zipf_graph(vocab_size, num_slots, device, seed=0):
    """CSR slot map with ``num_slots - 1`` owned edges: Zipf-like out-degrees (node r ~ 1 / (r + 1), at least 1,
    at most V), targets drawn by Zipf popularity without repeats."""
    gen = torch.Generator(device="cpu").manual_seed(seed)
    own = num_slots - 1
    share = 1.0 / torch.arange(1, vocab_size + 1, dtype=torch.float64)
    degrees = (share / share.sum() * own).floor().clamp(1, vocab_size).long()
    while int(degrees.sum()) != own:  # settle rounding on the nodes with room
        gap = own - int(degrees.sum())
        room = (degrees < vocab_size) if gap > 0 else (degrees > 1)
        step = torch.zeros_like(degrees)
        step[room.nonzero()[: abs(gap), 0]] = 1 if gap > 0 else -1
        degrees += step
    keys = torch.log(torch.rand(vocab_size, vocab_size, generator=gen, dtype=torch.float64)) / share[None, :]
    chosen = keys.to(device).argsort(dim=1, descending=True)  # weighted sampling without repeats
    width = torch.arange(vocab_size, device=device)[None, :] < degrees.to(device)[:, None]
    col_idx = torch.where(width, chosen, vocab_size).sort(dim=1).values[width].int()
    row_ptr = torch.cat([torch.zeros(1, dtype=torch.long), degrees.cumsum(0)])
    return row_ptr, col_idx.cpu()


def build(shape, device, dtype=torch.float32, seed=0):
    torch.manual_seed(seed)
    row_ptr, col_idx = zipf_graph(shape["vocab_size"], shape["num_slots"], device, seed)
    model = BriLLMForCausalLM.from_graph(BriLLMConfig(**shape), row_ptr, col_idx)
    return model.to(device=device, dtype=dtype)


def with_backend(backend, fn):
    old = os.environ.get("BRILLM_KERNELS")
    os.environ["BRILLM_KERNELS"] = backend
    try:
        return fn()
    finally:
        if old is None:
            del os.environ["BRILLM_KERNELS"]
        else:
            os.environ["BRILLM_KERNELS"] = old


def synchronize(device):
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def timed(fn, device, repeats=5):
    """Median seconds of ``fn()`` after one warm-up run."""
    fn()
    times = []
    for _ in range(repeats):
        synchronize(device)
        begin = time.perf_counter()
        fn()
        synchronize(device)
        times.append(time.perf_counter() - begin)
    return sorted(times)[len(times) // 2]


def relative(a, b):
    a = a.to_dense() if a.is_sparse else a
    return float((a.float() - b.float()).abs().max() / b.float().abs().max().clamp_min(1e-30))


def check_kernels(device, shape):
    """Kernel path against PyTorch on ``device``: a training step (dense and sparse gradients) and eval logits."""
    model = build(shape, device)
    V = shape["vocab_size"]
    ids = torch.randint(0, V, (4, 16), device=device)
    mask = torch.ones_like(ids)
    mask[1, :5] = 0
    mask[2, 12:] = 0
    labels = ids.masked_fill(mask == 0, -100)
    errors = {}
    for sparse in (False, True):
        model.set_sparse_gradients(sparse)
        runs = {}
        for backend in ("torch", "triton"):
            def step():
                model.zero_grad(set_to_none=True)
                loss = model(ids, attention_mask=mask, labels=labels).loss
                loss.backward()
                return loss.detach(), [p.grad for p in model.parameters()]

            runs[backend] = with_backend(backend, step)
        (loss0, grads0), (loss1, grads1) = runs["torch"], runs["triton"]
        errors[f"loss{'_sparse' if sparse else ''}"] = relative(loss1, loss0)
        for (name, _), g1, g0 in zip(model.named_parameters(), grads1, grads0):
            errors[f"{name.split('.')[-1]}{'_sparse' if sparse else ''}"] = relative(g1, g0.to_dense() if g0.is_sparse else g0)
    with torch.no_grad():
        logits = {b: with_backend(b, lambda: model(ids, attention_mask=mask).logits) for b in ("torch", "triton")}
    errors["eval_logits"] = relative(logits["triton"], logits["torch"])
    return errors


def copy_bandwidth(device, megabytes=1024):
    """Bytes moved per second (read + write) by a large device-to-device copy."""
    x = torch.empty(megabytes * 2**20 // 4, device=device)
    y = torch.empty_like(x)
    seconds = timed(lambda: y.copy_(x), device)
    return 2 * x.numel() * 4 / seconds


def slab_bytes(model, ids):
    """Bytes of the slabs (edge matrices + biases) one pass over ``ids`` reads: each distinct source's slab, once."""
    graph = model.get_edge_graph()
    distinct = torch.unique(ids)
    rows = int((graph.row_ptr[distinct + 1] - graph.row_ptr[distinct]).sum()) + 1
    d = model.config.hidden_size
    return rows * (d * d + d) * model.model.weights.element_size()


def bench_training(model, device, batch, length):
    V = model.config.vocab_size
    ids = torch.randint(0, V, (batch, length), device=device)
    model.set_sparse_gradients(True)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        optimizer.step()

    seconds = timed(step, device)
    # forward reads each slab once, backward reads it again and writes its gradient, SGD reads and writes it
    return {"tokens_per_s": batch * length / seconds, "ms": 1e3 * seconds, "bytes": 5 * slab_bytes(model, ids)}


def bench_eval(model, device, batch, length):
    ids = torch.randint(0, model.config.vocab_size, (batch, length), device=device)

    def run():
        with torch.no_grad():
            model(ids, labels=ids)

    seconds = timed(run, device)
    return {"tokens_per_s": batch * length / seconds, "ms": 1e3 * seconds, "bytes": slab_bytes(model, ids)}


def bench_generate(model, device, batch, new_tokens):
    prompts = torch.randint(0, model.config.vocab_size, (batch, 4), device=device)
    seconds = timed(lambda: model.generate(prompts, max_new_tokens=new_tokens, do_sample=False), device, repeats=3)
    out = model.generate(prompts, max_new_tokens=new_tokens, do_sample=False)
    return {"tokens_per_s": batch * new_tokens / seconds, "ms": 1e3 * seconds, "bytes": slab_bytes(model, out[:, 3:-1])}


def bench_recurrence(device, lengths, B=8, d=32):
    """Seconds of the recurrence's forward + backward alone (`signal_brillm.flow`) per backend and length: the
    kernel's cost is linear in T (at most 5x from T = 256 to 1024 is the bound the tests hold it to)."""
    from modeling_brillm.signal_brillm import BriLLMCache, EdgeInputs, flow

    seconds = {}
    for backend in ("torch", "triton"):
        for T in lengths:
            tensors = [torch.randn(B, T, d, device=device), torch.rand(B, T, d, d, device=device) - 0.5,
                       torch.rand(B, T, d, device=device) - 0.5]  # fmt: skip
            for t in tensors:
                t.requires_grad_()
            tokens = torch.zeros(B, T, dtype=torch.long, device=device)
            before = torch.arange(T, device=device).expand(B, T)
            pe, logits = torch.randn(B, T, d, device=device), torch.ones(B, T, device=device)

            def run():
                cache = BriLLMCache()
                cache.initialize(B, d, device, torch.float32)
                edges = EdgeInputs(tokens, tokens >= 0, before, tensors[0], tensors[1], tensors[2], pe, logits)
                signals, _ = flow(cache, edges)
                signals.sum().backward()

            seconds[f"{backend} T={T}"] = with_backend(backend, lambda: timed(run, device, repeats=3))
    return seconds


def table(rows, bandwidth):
    print(f"{'workload':<34} {'tokens/s':>12} {'ms':>10} {'slab MB':>10} {'of copy bw':>11}")
    for name, row in rows.items():
        fraction = row["bytes"] / (row["ms"] / 1e3) / bandwidth
        print(f"{name:<34} {row['tokens_per_s']:>12,.0f} {row['ms']:>10.2f} {row['bytes'] / 1e6:>10.1f} {fraction:>10.1%}")


def distributed_worker(shape, batch, length):
    """One torchrun process: a data-parallel sparse-gradient training step; rank 0 prints the total tokens/s."""
    import torch.distributed as dist

    dist.init_process_group("nccl")
    rank, world = dist.get_rank(), dist.get_world_size()
    device = torch.device("cuda", int(os.environ["LOCAL_RANK"]))
    torch.cuda.set_device(device)
    model = build(shape, device)
    model.set_sparse_gradients(True)
    ids = torch.randint(0, shape["vocab_size"], (batch, length), device=device, generator=None)
    optimizer = torch.optim.SGD(model.parameters(), lr=1e-3)

    def step():
        optimizer.zero_grad(set_to_none=True)
        model(ids, labels=ids).loss.backward()
        for p in model.parameters():
            grad = p.grad.coalesce() if p.grad.is_sparse else p.grad
            if grad.is_sparse:  # exchange touched rows: gather every rank's (slots, rows)
                slots = [None] * world
                dist.all_gather_object(slots, (grad.indices().cpu(), grad.values().cpu()))
                merged = sum(torch.sparse_coo_tensor(i, v, grad.shape) for i, v in slots).coalesce()
                p.grad = merged.to(device) / world
            else:
                dist.all_reduce(grad)
                p.grad = grad / world
        optimizer.step()

    seconds = timed(step, device, repeats=3)
    if rank == 0:
        print(f"{'train fp32, ' + str(world) + ' GPUs (torchrun)':<34} {world * batch * length / seconds:>12,.0f} "
              f"{1e3 * seconds:>10.2f}")  # fmt: skip
    dist.destroy_process_group()


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--json", help="also write the results here")
    parser.add_argument("--smoke", action="store_true", help="tiny shape on the CPU (needs TRITON_INTERPRET=1)")
    parser.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)  # one torchrun process
    args = parser.parse_args()
    if args.worker:
        return distributed_worker(ENGLISH, 8, 128)
    if args.smoke:  # (a script may set its own environment: the kernel path on the CPU)
        os.environ["BRILLM_KERNELS"] = "triton"
        device, shape, train_shape, eval_shape, new_tokens = torch.device("cpu"), SMOKE, (2, 8), (2, 8), 3
    elif not torch.cuda.is_available():
        print("bench_gpu: no CUDA device here; nothing to measure (the kernels are verified on CPU by tests/test_kernels.py).")
        return 0
    else:
        device, shape, train_shape, eval_shape, new_tokens = torch.device("cuda"), ENGLISH, (8, 128), (32, 128), 64
    results = {"device": torch.cuda.get_device_name(device) if device.type == "cuda" else "cpu (smoke)"}
    print(f"device: {results['device']}")
    errors = check_kernels(device, SMOKE if args.smoke else {"vocab_size": 96, "num_slots": 1 + 96 * 12, "hidden_size": 32})
    results["kernel_errors"] = errors
    print("kernels vs PyTorch (largest relative error):", f"{max(errors.values()):.2e}", "(bound 1e-5)")
    bandwidth = copy_bandwidth(device, 64 if args.smoke else 1024)
    results["copy_bandwidth_GBps"] = bandwidth / 1e9
    print(f"device-to-device copy: {bandwidth / 1e9:.0f} GB/s moved")
    rows = {}
    for name, dtype in (("fp32", torch.float32), ("bf16 weights", torch.bfloat16)):
        model = build(shape, device, dtype)
        rows[f"train {name}, 1 GPU ({train_shape[0]}x{train_shape[1]})"] = bench_training(model, device, *train_shape)
        if dtype == torch.float32:
            rows[f"eval fp32 ({eval_shape[0]}x{eval_shape[1]})"] = bench_eval(model, device, *eval_shape)
            rows["generate batch 1"] = bench_generate(model, device, 1, new_tokens)
            rows["generate batch 32"] = bench_generate(model, device, 32, new_tokens)
        del model
    table(rows, bandwidth)
    results["rows"] = rows
    recurrence = bench_recurrence(device, (16, 64) if args.smoke else (256, 1024), B=2 if args.smoke else 8)
    results["recurrence_seconds"] = recurrence
    print("recurrence fwd+bwd (B=8, d=32):", ", ".join(f"{k}: {1e3 * v:.1f} ms" for k, v in recurrence.items()))
    gpus = torch.cuda.device_count() if device.type == "cuda" else 1
    if gpus > 1:
        command = ["torchrun", f"--nproc_per_node={gpus}", __file__, "--worker"]
        subprocess.run(command, check=True, timeout=180)
    if args.json:
        Path(args.json).write_text(json.dumps(results, indent=2))
    return 0


if __name__ == "__main__":
    sys.exit(main())
