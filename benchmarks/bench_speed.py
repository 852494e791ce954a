#!/usr/bin/env python
"""Speed of scoring, training and generation against the reference algorithm, side by side (issue 6).

    python benchmarks/bench_speed.py [--json speed.json] [--threads 2] [--compile] [--wait 90]

Builds the mid-size synthetic model of ``PERF_NOTES.md`` (V=2000, d=32, Zipf-like out-degrees 22 .. 2000 with
median 44, about 6 % of the edges owned, random reference-style init) and batches drawn by random walks on its
graph, then times each workload on our fast path (`BriLLMForCausalLM`) and on `reference_path.ReferencePath`
(the reference code's algorithm and costs) in the same process, and checks that both give the same numbers:

* eval: 4 x 32 tokens, exact full-vocabulary loss, no grad (the reference scores all V candidates);
* train: 8 x 32 tokens, forward + backward of our exact full-vocabulary loss, dense and sparse gradients
  (the reference: its sampled step, true target + 400 negatives);
* generate: greedy, 64 new tokens, batch 1 through ``model.generate`` (the reference: ``decode``);
* generate 32 distinct prompts x 64 tokens in one batched ``generate`` (the reference: one after another);
  both generation workloads also against the reference listing its candidates as the published decoder does;
* the generation floor: ``generate`` around a step that costs nothing, plus the time to read the slab bytes of
  the real steps at the large-copy rate, which bounds the ratio any step inside ``generate`` could reach here;
* bandwidth: bytes of the slabs scored per second against a large-copy bandwidth;
* time per decoding step after a context of 32 and of 4096 tokens, the same tokens fed after each (the
  reference: its decoding after 32 and 448);
* memory of a whole training step (AdamW in fp32, dense; SGD and lazy-row AdamW on sparse gradients) in bytes
  per parameter, projected to the released English shape (906,998 slots).

Each timing is the median of several runs. The benchmark machines are shared, so each run starts in a quiet
moment, follows one untimed run of the same workload (ours and the reference's alike), and is repeated when
other processes took the CPUs meanwhile (`QuietGuard`, bounded waits; the report says how many runs stayed
disturbed); our runs alternate with the reference's so that both meet the same conditions. Peak memory is the
growth of the resident set above its level at the start of a workload (``VmHWM`` after resetting it; memory the
allocator already holds does not show). Huge pages for large tensors are on (``THP_MEM_ALLOC_ENABLE=1``, as for
training entry points), for both paths alike; set it to 0 to compare.
Prints a table and writes JSON. Takes 2-4 minutes on 2 idle cores.
"""

import os

os.environ.setdefault("THP_MEM_ALLOC_ENABLE", "1")  # read when torch is imported: huge pages for large buffers

import argparse  # noqa: E402
import copy  # noqa: E402
import json  # noqa: E402
import statistics  # noqa: E402
import time  # noqa: E402
from pathlib import Path  # noqa: E402

import torch  # noqa: E402
import transformers  # noqa: E402

from reference_path import ReferencePath  # noqa: E402

from modeling_brillm import BriLLMConfig, BriLLMForCausalLM  # noqa: E402
from modeling_brillm.train import TrainRecipe, build_optimizer, build_scheduler, objective_loss, train_step  # noqa: E402

ENGLISH_SLOTS, ENGLISH_VOCAB = 906_998, 4000
MB = 1e6


# ----------------------------------------------------------------------------------------------------------------
# The synthetic model and its batches


def synthetic_graph(vocab_size=2000, seed=0):
    """CSR slot map with Zipf-like out-degrees: node r owns ``round(38600 (r + 1) ** -0.98)`` edges, clipped to
    [22, V] (median 44, mean ~118), to targets drawn by Zipf popularity (node r has weight 1 / (r + 1))."""
    generator = torch.Generator().manual_seed(seed)
    rank = torch.arange(vocab_size, dtype=torch.float64)
    degrees = (38600.0 * (rank + 1) ** -0.98).round().clamp(22, vocab_size).long()
    gumbel = -torch.log(-torch.log(torch.rand(vocab_size, vocab_size, generator=generator, dtype=torch.float64)))
    chosen = (-torch.log(rank + 1)[None, :] + gumbel).argsort(dim=1, descending=True)  # weighted, no repeats
    col_idx = torch.cat([chosen[s, : degrees[s]].sort().values for s in range(vocab_size)]).int()
    row_ptr = torch.cat([torch.zeros(1, dtype=torch.long), degrees.cumsum(0)])
    return row_ptr, col_idx


def random_walks(row_ptr, col_idx, batch, length, seed):
    """Texts (batch, length) that follow the graph: 90 % of the steps take an owned edge (targets weighted by
    popularity), the rest jump to a popular node (a shared edge)."""
    generator = torch.Generator().manual_seed(seed)
    popularity = 1.0 / torch.arange(1, row_ptr.numel(), dtype=torch.float64)
    texts = torch.empty(batch, length, dtype=torch.long)
    for b in range(batch):
        node = int(torch.multinomial(popularity, 1, generator=generator))
        texts[b, 0] = node
        for i in range(1, length):
            owned = col_idx[row_ptr[node] : row_ptr[node + 1]].long()
            if float(torch.rand(1, generator=generator)) < 0.9:
                node = int(owned[torch.multinomial(popularity[owned], 1, generator=generator)])
            else:
                node = int(torch.multinomial(popularity, 1, generator=generator))
            texts[b, i] = node
    return texts


def build_model():
    torch.manual_seed(0)
    row_ptr, col_idx = synthetic_graph()
    # The reference decoder never proposes the current token; its PE offset differs from its forward's and is
    # set per workload (`decoder_positions`), so that every result can be compared with the reference path's.
    config = BriLLMConfig(vocab_size=2000, hidden_size=32, num_slots=1 + col_idx.numel(), suppress_self_loop=True)
    model = BriLLMForCausalLM.from_graph(config, row_ptr, col_idx)
    with torch.no_grad():
        model.model.positions.normal_(1.0, 0.5)
    return model.eval(), row_ptr, col_idx


class decoder_positions:
    """Within this block the model uses the reference decoder's positional offset (``position_shift=0``)."""

    def __init__(self, model):
        self.config = model.config

    def __enter__(self):
        self.config.position_shift = 0

    def __exit__(self, *exc):
        self.config.position_shift = 1


def candidates_all(texts, vocab_size):
    """(B, L-1, V): for each edge, the true next token, then every other node in id order."""
    B, L = texts.shape
    others = torch.arange(vocab_size).expand(B, L - 1, vocab_size)
    keep = others != texts[:, 1:, None]
    rest = others[keep].view(B, L - 1, vocab_size - 1)
    return torch.cat([texts[:, 1:, None], rest], 2)


def candidates_sampled(texts, row_ptr, col_idx, k=400):
    """(B, L-1, 1 + k): the true next token, then the k most frequent successors of the source other than it.
    The synthetic frequency ranks owned targets first, then the rest, each by popularity (node id)."""
    V = row_ptr.numel() - 1
    B, L = texts.shape
    out = torch.empty(B, L - 1, 1 + k, dtype=torch.long)
    for b in range(B):
        for i in range(L - 1):
            source, true = int(texts[b, i]), int(texts[b, i + 1])
            owned = col_idx[row_ptr[source] : row_ptr[source + 1]].tolist()
            owned_set = set(owned)
            ranked = owned + [t for t in range(V) if t not in owned_set]
            out[b, i] = torch.tensor([true] + [t for t in ranked[: k + 1] if t != true][:k])
    return out


# ----------------------------------------------------------------------------------------------------------------
# Measuring on a shared machine


class QuietGuard:
    """Times runs on a shared machine: starts each one in a quiet moment and retries it when other processes took
    more than ``threshold`` of the CPUs meanwhile (read from ``/proc/stat`` minus this process's own ticks).
    Waits at most ``patience`` seconds per run and ``budget`` seconds in all, so that a busy machine only makes
    the numbers worse (and says so), never the run endless."""

    def __init__(self, threshold=0.15, patience=10.0, budget=90.0, tries=3):
        self.threshold, self.patience, self.budget, self.tries = threshold, patience, budget, tries
        self.waited_s, self.disturbed = 0.0, 0

    @staticmethod
    def _ticks():
        with open("/proc/stat") as f:
            user, nice, system, idle, iowait, irq, softirq, steal = map(int, f.readline().split()[1:9])
        with open("/proc/self/stat") as f:
            own = sum(map(int, f.read().rsplit(")", 1)[1].split()[11:13]))  # utime + stime, all threads
        return user + nice + system + irq + softirq + steal, idle + iowait, own

    def others(self, before, after):
        """Share of all CPU time that other processes used between two `_ticks` readings."""
        busy, idle, own = (b - a for a, b in zip(before, after))
        return max(busy - own, 0) / max(busy + idle, 1)

    def wait(self):
        start = time.perf_counter()
        while time.perf_counter() - start < min(self.patience, self.budget - self.waited_s):
            before = self._ticks()
            time.sleep(0.25)
            if self.others(before, self._ticks()) < self.threshold:
                break
        self.waited_s += time.perf_counter() - start

    def time(self, fn):
        """Seconds of one undisturbed run of ``fn()`` (or of the last try, counted as disturbed). Each timed run
        follows an untimed one: after the quiet wait's sleep the cores run slow and the worker threads sleep, which
        a run of a few milliseconds would otherwise pay for."""
        for _ in range(self.tries):
            self.wait()
            fn()
            before, start = self._ticks(), time.perf_counter()
            fn()
            elapsed = time.perf_counter() - start
            if self.others(before, self._ticks()) < self.threshold:
                return elapsed
            if self.waited_s >= self.budget:  # a busy machine: no more retries either
                break
        self.disturbed += 1
        return elapsed


def _status_kb(field):
    with open("/proc/self/status") as f:
        return next(int(line.split()[1]) for line in f if line.startswith(field + ":"))


def measure(guard, fn, repeats, warmup=1):
    """Seconds of ``fn()`` (median, min, all) and the peak growth of the resident set (MB) while it ran."""
    for _ in range(warmup):
        fn()
    base = _status_kb("VmRSS")
    with open("/proc/self/clear_refs", "w") as f:
        f.write("5")  # reset VmHWM to the current resident set
    times = [guard.time(fn) for _ in range(repeats)]
    peak = _status_kb("VmHWM")
    return summary(times, (peak - base) / 1e3, peak)


def summary(times, peak_mb, peak_kb=None):
    return {"median_s": statistics.median(times), "min_s": min(times), "times_s": times, "peak_mb": peak_mb,
            "peak_kb": peak_kb}  # fmt: skip


def compare(guard, ours, theirs, rounds, per_round):
    """Ours against the reference in interleaved rounds, so that both meet the same load on a shared machine:
    per round one reference run, then ``per_round`` of ours (after one warm-up of ours)."""
    ours()
    runs = {"ours": [], "reference": []}
    for _ in range(rounds):
        runs["reference"].append(measure(guard, theirs, 1, 0))
        runs["ours"].append(measure(guard, ours, per_round, 0))
    return {
        name: summary([t for r in rs for t in r["times_s"]], max(r["peak_mb"] for r in rs))
        for name, rs in runs.items()
    }


# ----------------------------------------------------------------------------------------------------------------
# Workloads


def bench_eval(model, ref, guard, texts):
    candidates = candidates_all(texts, model.config.vocab_size)  # data preparation, not timed
    ours = lambda: model(texts, labels=texts).loss  # noqa: E731
    theirs = lambda: ref.loss(texts, candidates)  # noqa: E731
    with torch.no_grad():
        error = abs(float(ours()) - float(theirs()))
        assert error < 1e-4, f"eval losses differ by {error}"
        return {**compare(guard, ours, theirs, 5, 5), "loss_error": error}


def bench_train(model, ref, guard, texts, row_ptr, col_idx):
    sampled = candidates_sampled(texts[:, :31], row_ptr, col_idx)  # the reference trains 30 of the 31 edges

    def ours():
        model.zero_grad(set_to_none=True)
        model(texts, labels=texts).loss.backward()

    def ours_sparse():
        model.set_sparse_gradients(True)
        ours()
        model.set_sparse_gradients(False)

    def theirs():
        model.zero_grad(set_to_none=True)
        ref.loss(texts[:, :31], sampled).backward()

    model.train()
    result = compare(guard, ours, theirs, 2, 3)
    result["ours_dense"] = result.pop("ours")
    result["ours_sparse"] = measure(guard, ours_sparse, 5, 1)
    with torch.no_grad():  # the same sampled objective on both paths
        error = abs(float(ref.loss(texts[:, :31], sampled)) - float(model.sampled_loss(texts[:, :31], sampled)))
    model.zero_grad(set_to_none=True)
    model.eval()
    assert error < 1e-4, f"sampled losses differ by {error}"
    result["sampled_loss_error"] = error
    return result


def bench_generate(model, ref, guard, prompts, new_tokens=64):
    """Greedy generation of every prompt at once (ours) and one after another (the reference); same tokens.
    Also times the reference with its candidates listed as the published decoder lists them."""
    generate = lambda: model.generate(prompts, max_new_tokens=new_tokens, do_sample=False)  # noqa: E731
    decode = lambda: [ref.decode(p, new_tokens) for p in prompts.tolist()]  # noqa: E731
    published = lambda: [ref.decode(p, new_tokens, published_candidates=True) for p in prompts.tolist()]  # noqa: E731
    assert generate()[:, prompts.shape[1] :].tolist() == decode(), "greedy tokens differ from the reference's"
    result = compare(guard, generate, decode, 3 if len(prompts) == 1 else 1, 4)
    result["reference_published"] = measure(guard, published, 3 if len(prompts) == 1 else 1, 0)
    return {**result, "same_tokens": True}


def bench_generate_floor(model, guard, prompts, new_tokens=64):
    """What ``generate`` costs around the model, and what the model must read: the same greedy calls with a
    decoding step that only returns fixed logits, and the slab bytes that the real greedy steps score."""
    base, V = model.model, model.config.vocab_size
    generated = model.generate(prompts, max_new_tokens=new_tokens, do_sample=False)
    scored = generated[:, prompts.shape[1] - 1 : -1]  # the tokens whose slabs each step scores, once per source
    slots = sum(int(base.graph.degrees()[step.unique()].sum()) + 1 for step in scored.t())  # + the shared slot
    slab_bytes = slots * model.config.hidden_size * (model.config.hidden_size + 1) * base.weights.element_size()
    fixed = torch.randn(len(prompts), V)

    def free_step(input_ids, attention_mask, cache):
        if not base._decodable(input_ids, attention_mask, cache):
            return None
        cache.seen_positions += 1
        return fixed

    base._decode_step = free_step  # for this instance only
    try:
        seconds = measure(guard, lambda: model.generate(prompts, max_new_tokens=new_tokens, do_sample=False), 5, 1)
    finally:
        del base._decode_step
    return {"framework_s": seconds["median_s"], "slab_bytes": slab_bytes}


def bench_context(model, ref, guard, row_ptr, col_idx, new_tokens=64):
    """Seconds per decoding step after a context of 32 and of 4096 tokens: the same next tokens (the walk that
    continues the text) fed one at a time through the cache, so that only the context differs. The reference:
    its decoding after contexts of 32 and 448 tokens (its limit is 512)."""
    text = random_walks(row_ptr, col_idx, 1, 4096 + new_tokens, seed=4096)
    context, continuation = text[:, :4096], text[0, 4096:].view(-1, 1, 1)
    result, decoders = {}, {}
    for length in (32, 4096):
        with torch.no_grad():
            prefilled = model(context[:, -length:], use_cache=True).past_key_values

        def decode(prefilled=prefilled):
            state = copy.deepcopy(prefilled)
            with torch.no_grad():
                for token in continuation:
                    model(token, past_key_values=state, use_cache=True)

        decoders[length] = decode
    times = {length: [] for length in decoders}
    for i in range(7):  # alternating, so that both contexts meet the same load
        for length in (32, 4096) if i % 2 else (4096, 32):
            times[length].append(guard.time(decoders[length]))
    for length, seconds in times.items():
        result[f"ours_{length}"] = statistics.median(seconds) / new_tokens
    for length in (32, 448):
        prompt = context[0, -length:].tolist()
        result[f"reference_{length}"] = measure(guard, lambda: ref.decode(prompt, 16), 2, 0)["median_s"] / 16
    return result


def copy_bandwidth(guard, megabytes=512):
    """Bytes moved per second (read + write) by ``y.copy_(x)`` of a large float32 tensor."""
    x = torch.ones(int(megabytes * MB) // 4)
    y = torch.empty_like(x)
    seconds = measure(guard, lambda: y.copy_(x), 5, 1)["min_s"]
    return 2 * x.numel() * 4 / seconds


def bench_bandwidth(model, guard, texts, bandwidth):
    """Scoring alone (`score_next` on the eval batch's signals): slab bytes read per second."""
    base = model.model
    with torch.no_grad():
        out = base(texts)
        score = lambda: base.score_next(texts, out.last_hidden_state, out.signal_positions)  # noqa: E731
        seconds = measure(guard, score, 15, 2)["median_s"]
    sources = texts.reshape(-1).unique()
    slots = int((base.graph.row_ptr[sources + 1] - base.graph.row_ptr[sources]).sum()) + 1  # own slabs + slot 0
    d = model.config.hidden_size
    slab_bytes = slots * (d * d + d) * base.weights.element_size()
    return {
        "slab_bytes": slab_bytes,
        "scoring_s": seconds,
        "read_rate": slab_bytes / seconds,
        "copy_bandwidth": bandwidth,
        "fraction": slab_bytes / seconds / bandwidth,
    }


def bench_training_memory(model, guard, texts):
    """Resident bytes per parameter of whole training steps (zero_grad, forward, backward, optimizer step):
    weights, gradients, optimizer state and the step's temporaries, over the number of parameters."""
    params = sum(p.numel() for p in model.parameters())
    result = {"parameters": params}
    setups = {  # brillm train's optimizers (train.build_optimizer) and step (train.train_step)
        "adamw_fp32_dense": TrainRecipe(learning_rate=1e-3, optimizer="adamw"),
        "sgd_sparse": TrainRecipe(learning_rate=1e-3, optimizer="sgd", sparse_gradients=True),
        "lazy_adamw_sparse": TrainRecipe(learning_rate=1e-3, optimizer="lazy_adamw", sparse_gradients=True),
    }
    mask = torch.ones_like(texts)
    for name, settings in setups.items():
        before = _status_kb("VmRSS")
        trained = copy.deepcopy(model).train()
        optimizer = build_optimizer(trained, settings)
        scheduler = build_scheduler(optimizer, settings, num_steps=4)

        def step():
            train_step(trained, objective_loss, texts, mask, optimizer, scheduler)

        timing = measure(guard, step, 3, 1)  # the warm-up step creates the optimizer state
        grown = (timing["peak_kb"] - before) * 1024  # the copy's weights, gradients, optimizer state, temporaries
        result[name] = {"step_s": timing["median_s"], "bytes_per_parameter": grown / params}
        del trained, optimizer, scheduler, step
    return result


def english_projection(bytes_per_parameter, d=32):
    """Training memory of the released English shape (906,998 slots, V=4000) at the measured bytes/parameter."""
    params = ENGLISH_SLOTS * (d * d + d) + ENGLISH_VOCAB * d + 512
    return {"parameters": params, **{k: v * params / 1e9 for k, v in bytes_per_parameter.items()}}


def bench_compile(model, guard, texts):
    """``torch.compile`` (dynamic shapes) of the no-grad scoring epilogue, norm(GELU(z)) over the eval batch's
    pre-activations, against the eager in-place version the model runs."""
    from modeling_brillm.scoring_brillm import gelu, plan_scoring, preactivations

    base = model.model
    with torch.no_grad():
        signals = base(texts).last_hidden_state.reshape(-1, model.config.hidden_size)
        plan = plan_scoring(base.graph, texts.reshape(-1))
        z = preactivations(signals[plan.order], torch.randn_like(signals), base.weights, base.biases, plan)
        eager = lambda z: torch.linalg.vector_norm(gelu(z, inplace=True), dim=-1)  # noqa: E731
        compiled = torch.compile(lambda z: torch.linalg.vector_norm(torch.nn.functional.gelu(z), dim=-1), dynamic=True)
        start = time.perf_counter()
        compiled(z)
        compile_s = time.perf_counter() - start
        return {
            "compile_s": compile_s,
            "eager_s": measure(guard, lambda: eager(z), 20, 2)["median_s"],  # (z's values drift; the cost does not)
            "compiled_s": measure(guard, lambda: compiled(z), 20, 2)["median_s"],
        }


# ----------------------------------------------------------------------------------------------------------------


def table(results):
    rows = [("workload", "ours", "reference", "ratio", "target", "ours tok/s", "ref tok/s", "peak MB ours / ref")]

    def row(name, ours, ref, tokens, target):
        o, r = ours["median_s"], ref["median_s"]
        peak = f"{ours['peak_mb']:.0f} / " + ("-" if ref.get("peak_mb") is None else f"{ref['peak_mb']:.0f}")
        rows.append((name, f"{o * 1e3:.1f} ms", f"{r * 1e3:.0f} ms", f"{r / o:.1f}x", target,
                     f"{tokens / o:,.0f}", f"{tokens / r:,.0f}", peak))  # fmt: skip

    e, t, g1, g32 = (results[k] for k in ("eval", "train", "generate_1", "generate_32"))
    row("eval 4x32, full vocab, no grad", e["ours"], e["reference"], 128, ">= 50x")
    row("train 8x32 fwd+bwd, dense grads", t["ours_dense"], t["reference"], 256, ">= 20x")
    row("train 8x32 fwd+bwd, sparse grads", t["ours_sparse"], t["reference"], 256, ">= 20x")
    row("generate 64 tokens, batch 1", g1["ours"], g1["reference"], 64, ">= 12x")
    row("  reference listing candidates as published", g1["ours"], g1["reference_published"], 64, ">= 12x")
    row("generate 32 prompts x 64 tokens", g32["ours"], g32["reference"], 32 * 64, ">= 20x")
    row("  reference listing candidates as published", g32["ours"], g32["reference_published"], 32 * 64, ">= 20x")
    widths = [max(len(r[i]) for r in rows) for i in range(len(rows[0]))]
    lines = ["  ".join(c.ljust(w) for c, w in zip(r, widths)) for r in rows]
    b, c = results["bandwidth"], results["context"]
    lines += [
        "",
        f"bandwidth: copy {b['copy_bandwidth'] / 1e9:.1f} GB/s (read + write); scoring reads "
        f"{b['slab_bytes'] / MB:.0f} MB of slabs in {b['scoring_s'] * 1e3:.1f} ms = {b['read_rate'] / 1e9:.1f} GB/s "
        f"= {100 * b['fraction']:.0f} % of it (target >= 30 %)",
        f"time per decoding step: ours {c['ours_32'] * 1e3:.3f} ms at context 32, {c['ours_4096'] * 1e3:.3f} ms at "
        f"4096 (ratio {c['ours_4096'] / c['ours_32']:.2f}); reference {c['reference_32'] * 1e3:.1f} ms at 32, "
        f"{c['reference_448'] * 1e3:.1f} ms at 448",
    ]
    for name, floor, g in (("batch 1", results["floor_1"], g1), ("32 prompts", results["floor_32"], g32)):
        reading = floor["slab_bytes"] / b["copy_bandwidth"]  # read at the large-copy rate, the fastest stream here
        best = floor["framework_s"] + reading
        lines.append(
            f"generate floor, {name}: generate() around a step that costs nothing takes "
            f"{floor['framework_s'] * 1e3:.1f} ms; the steps read {floor['slab_bytes'] / MB:.0f} MB of slabs, "
            f"{reading * 1e3:.1f} ms at the copy rate; no step inside generate() beats {best * 1e3:.1f} ms, "
            f"{g['reference']['median_s'] / best:.1f}x / {g['reference_published']['median_s'] / best:.1f}x here "
            f"(ours: {g['ours']['median_s'] * 1e3:.1f} ms)"
        )
    m, en = results["training_memory"], results["english_projection"]
    for name in ("adamw_fp32_dense", "sgd_sparse", "lazy_adamw_sparse"):
        lines.append(
            f"training step memory, {name}: {m[name]['bytes_per_parameter']:.1f} bytes/parameter "
            f"({m[name]['step_s'] * 1e3:.0f} ms per step with the optimizer); English shape "
            f"({en['parameters'] / 1e9:.2f} B parameters): {en[name]:.1f} GB"
        )
    if "compile" in results:
        k = results["compile"]
        lines.append(
            f"torch.compile of the scoring epilogue: eager {k['eager_s'] * 1e3:.2f} ms, compiled "
            f"{k['compiled_s'] * 1e3:.2f} ms (compiling took {k['compile_s']:.0f} s)"
        )
    return "\n".join(lines)


def main():
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--json", default="speed.json", help="where to write the results (default: speed.json)")
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--compile", action="store_true", help="also time torch.compile of the scoring epilogue")
    parser.add_argument("--wait", type=float, default=90.0, help="seconds to wait for quiet moments in all (90)")
    args = parser.parse_args()
    torch.set_num_threads(args.threads)
    transformers.logging.set_verbosity_error()  # not the note that 4096 tokens exceed max_position_embeddings
    started = time.perf_counter()
    model, row_ptr, col_idx = build_model()
    ref = ReferencePath(model)
    guard = QuietGuard(budget=args.wait)
    eval_texts = random_walks(row_ptr, col_idx, 4, 32, seed=4)
    train_texts = random_walks(row_ptr, col_idx, 8, 32, seed=8)
    prompts = random_walks(row_ptr, col_idx, 32, 4, seed=32)
    results = {"threads": args.threads, "thp": os.environ["THP_MEM_ALLOC_ENABLE"]}
    results["eval"] = bench_eval(model, ref, guard, eval_texts)
    results["train"] = bench_train(model, ref, guard, train_texts, row_ptr, col_idx)
    with decoder_positions(model):
        results["generate_1"] = bench_generate(model, ref, guard, prompts[:1])
        results["floor_1"] = bench_generate_floor(model, guard, prompts[:1])
        results["floor_32"] = bench_generate_floor(model, guard, prompts)
        results["generate_32"] = bench_generate(model, ref, guard, prompts)
        results["context"] = bench_context(model, ref, guard, row_ptr, col_idx)
    results["bandwidth"] = bench_bandwidth(model, guard, eval_texts, copy_bandwidth(guard))
    results["training_memory"] = bench_training_memory(model, guard, train_texts)
    results["english_projection"] = english_projection(
        {k: v["bytes_per_parameter"] for k, v in results["training_memory"].items() if k != "parameters"}
    )
    if args.compile:
        results["compile"] = bench_compile(model, guard, eval_texts)
    results["quiet_wait_s"], results["disturbed_runs"] = guard.waited_s, guard.disturbed
    results["total_s"] = time.perf_counter() - started
    print(table(results))
    print(
        f"\nwaited {guard.waited_s:.0f} s for quiet moments; {guard.disturbed} runs disturbed by other processes; "
        f"total {results['total_s']:.0f} s; JSON: {args.json}"
    )
    Path(args.json).write_text(json.dumps(results, indent=2))


if __name__ == "__main__":
    main()
