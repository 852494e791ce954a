"""Distributed training on 2 CPU processes (gloo): sparse updates sized by the batch, FSDP2, no silent fallbacks."""

import contextlib
import itertools
import json
import os
import signal
import socket
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from test_training import final_weights, make_prepared, run_train, write_recipe

from modeling_brillm import BriLLMConfig, BriLLMForCausalLM
from modeling_brillm.distributed import launch_mismatch
from modeling_brillm.train import epoch_batches

REPO = Path(__file__).resolve().parent.parent
TWO_PROCESSES = REPO / "configuration" / "accelerate" / "cpu-2proc.yaml"
STEPS = 4
LAUNCH_TIMEOUT = 180


def free_port():
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def launch(recipe, tmp_path, *args, config=TWO_PROCESSES, env=None, launcher_args=()):
    """``accelerate launch`` of the training script on 2 CPU processes; returns the CompletedProcess."""
    command = [
        sys.executable, "-m", "accelerate.commands.launch", "--config_file", str(config),
        "--main_process_port", str(free_port()), *launcher_args,
        "-m", "modeling_brillm.train", "--config", str(recipe), *args,
    ]  # fmt: skip
    environment = {**os.environ, "ACCELERATE_USE_CPU": "1", "OMP_NUM_THREADS": "1", "HF_HUB_OFFLINE": "1",
                   "HF_HOME": str(tmp_path / "hf"), "PYTHONFAULTHANDLER": "1", **(env or {})}  # fmt: skip
    process = subprocess.Popen(command, stdout=subprocess.PIPE, stderr=subprocess.PIPE, text=True, cwd=REPO,
                               env=environment)  # fmt: skip
    try:
        stdout, stderr = process.communicate(timeout=LAUNCH_TIMEOUT)
    except subprocess.TimeoutExpired:
        # Say where it hangs: with PYTHONFAULTHANDLER set, SIGABRT makes every process print its Python stacks.
        for pid in [*descendants(process.pid), process.pid]:
            with contextlib.suppress(ProcessLookupError):
                os.kill(pid, signal.SIGABRT)
        try:
            stdout, stderr = process.communicate(timeout=30)
        finally:
            for pid in [*descendants(process.pid), process.pid]:
                with contextlib.suppress(ProcessLookupError):
                    os.kill(pid, signal.SIGKILL)
        pytest.fail(f"the launch did not end in {LAUNCH_TIMEOUT} s (a normal one takes ~10 s); its output and the "
                    f"stacks of its processes:\n{stdout[-3000:]}\n{stderr[-12000:]}")  # fmt: skip
    return subprocess.CompletedProcess(command, process.returncode, stdout, stderr)


def descendants(pid):
    """Every live descendant of process ``pid`` (the launcher's workers), from /proc."""
    children = {}
    for stat in Path("/proc").glob("[0-9]*/stat"):
        with contextlib.suppress(OSError):
            fields = stat.read_text().rsplit(")", 1)[1].split()
            children.setdefault(int(fields[1]), []).append(int(stat.parent.name))
    found, todo = [], [pid]
    while todo:
        kids = children.get(todo.pop(), [])
        found += kids
        todo += kids
    return found


def logged(output_dir, key):
    state = json.loads((Path(output_dir) / f"checkpoint-{STEPS}" / "trainer_state.json").read_text())
    return [entry[key] for entry in state["log_history"] if key in entry]


def assert_weights_close(a, b):
    assert a.keys() == b.keys()
    for name in a:
        scale = float(a[name].abs().max()) or 1.0
        torch.testing.assert_close(a[name], b[name], rtol=1e-6, atol=1e-6 * scale, msg=name)


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    return make_prepared(tmp_path_factory.mktemp("prepared"))


@pytest.fixture(scope="module")
def dense_ddp(prepared, tmp_path_factory):
    """A 2-process DDP run with dense gradients and fused AdamW (the default)."""
    tmp = tmp_path_factory.mktemp("ddp")
    recipe = write_recipe(tmp / "r.json", prepared, tmp / "out", max_steps=STEPS, save_steps=STEPS, log_steps=1)
    result = launch(recipe, tmp, "--debug-dir", str(tmp / "debug"))
    assert result.returncode == 0, result.stderr[-3000:]
    return tmp


def touched_rows(prepared, batch_size, step, rank, world):
    """Slots a process's batch touches at a step: slot 0 and the slab of every distinct token (sources)."""
    from datasets import load_from_disk

    train = load_from_disk(str(prepared / "dataset"))["train"]
    rows = epoch_batches(len(train), batch_size, epoch=0, seed=3, rank=rank, world_size=world)[step]
    row_ptr = load_file(prepared / "model" / "model.safetensors")["model.graph.row_ptr"]
    tokens = torch.tensor([train[i]["input_ids"] for i in rows]).unique()
    return 1 + int((row_ptr[tokens + 1] - row_ptr[tokens]).sum())


def test_sparse_two_processes_equal_one_process_on_the_union_and_send_only_touched_rows(prepared, dense_ddp, tmp_path):
    sparse = {"optimizer": "lazy_adamw", "sparse_gradients": True, "max_grad_norm": 0.5, "log_steps": 1}
    two = write_recipe(tmp_path / "two.json", prepared, tmp_path / "two", max_steps=STEPS, save_steps=STEPS, **sparse)
    result = launch(two, tmp_path, "--debug-dir", str(tmp_path / "debug"))
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads((tmp_path / "debug" / f"rank{r}.json").read_text()) for r in range(2)]
    assert records[0]["weights_checksum"] == records[1]["weights_checksum"]  # identical weights on every rank
    # One process taking both halves of every global batch: the union of the two processes' batches.
    one = write_recipe(tmp_path / "one.json", prepared, tmp_path / "one", max_steps=STEPS, save_steps=STEPS,
                       **{**sparse, "batch_size": 8})  # fmt: skip
    assert run_train(one).returncode == 0
    assert_weights_close(final_weights(tmp_path / "one"), final_weights(tmp_path / "two"))

    # Bytes per step: the rows of the process with most touched slots (its padding), plus the dense node_bias and
    # positions through DDP; never the (P, d, d) tensor, which dense DDP all-reduces whole every step.
    config = BriLLMConfig.from_pretrained(prepared / "model")
    d, P = config.hidden_size, config.num_slots
    dense_part = (config.vocab_size * d + config.max_position_embeddings) * 4
    expected = []
    for step in range(STEPS):
        rows = max(touched_rows(prepared, 4, step, rank, 2) for rank in range(2))
        expected.append(dense_part + 2 * 8 + rows * (8 + d * d * 4) + rows * (8 + d * 4))
    assert logged(tmp_path / "two", "gradient_bytes_sent") == expected
    all_gradients = (P * (d * d + d)) * 4 + dense_part
    assert logged(dense_ddp / "out", "gradient_bytes_sent") == [all_gradients] * STEPS
    # (This 30-character model's batches touch nearly every slot; see the next test for a graph where they do not.)


def test_sparse_exchange_sends_the_same_bytes_whatever_the_untouched_slots(tmp_path):
    """Two graphs that differ only in the slabs of nodes no batch visits: equal bytes, equal averaged gradients,
    equal to one process's gradient of the union of the two batches."""
    V, d = 24, 4
    small = [[s, (s + 1) % V, (s + 5) % V] for s in range(V)]
    large = [sorted(set(targets) | (set(range(V)) if s >= 12 else set())) for s, targets in enumerate(small)]
    graphs = []
    for rows in (small, large):
        row_ptr = [0]
        for targets in rows:
            row_ptr.append(row_ptr[-1] + len(targets))
        graphs.append([row_ptr, [t for targets in rows for t in sorted(targets)]])
    generator = torch.Generator().manual_seed(1)
    batches = [torch.randint(0, 12, (3, 6), generator=generator).tolist() for _ in range(2)]  # nodes 0..11 only
    task = tmp_path / "task.json"
    task.write_text(json.dumps({"batches": batches, "graphs": graphs, "hidden_size": d, "output": str(tmp_path)}))
    command = [sys.executable, "-m", "torch.distributed.run", "--nproc_per_node", "2", "--master_port",
               str(free_port()), str(REPO / "tests" / "distributed_worker.py"), str(task)]  # fmt: skip
    env = {**os.environ, "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    result = subprocess.run(command, capture_output=True, text=True, cwd=REPO, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-3000:]
    strategies = ("gather", "all_reduce")
    reports = {(r, g, s): json.loads((tmp_path / f"rank{r}-graph{g}-{s}.json").read_text())
               for r in range(2) for g in range(2) for s in strategies}  # fmt: skip
    assert all(report["coalesced"] for report in reports.values())
    touched = [{0} | {row_ptr_slot for t in set(sum(batch, [])) for row_ptr_slot in range(1 + 3 * t, 4 + 3 * t)}
               for batch in batches]  # slot 0 and the 3 owned edges of each distinct source (graph 0 numbering)
    most, union = max(map(len, touched)), len(touched[0] | touched[1])
    ids = 8 + most * 8  # the row count and the (padded) slot ids, for weights and for biases
    expected = {"gather": 2 * ids + most * (d * d + d) * 4, "all_reduce": 2 * ids + union * (d * d + d) * 4}
    for strategy in strategies:  # the same bytes on every rank for both graphs: P does not matter
        assert {reports[key]["bytes"] for key in reports if key[2] == strategy} == {expected[strategy]}
    for number, (row_ptr, col_idx) in enumerate(graphs):
        config = BriLLMConfig(vocab_size=V, hidden_size=d, num_slots=1 + len(col_idx))
        torch.manual_seed(0)
        model = BriLLMForCausalLM.from_graph(config, torch.tensor(row_ptr), torch.tensor(col_idx))
        model.set_sparse_gradients(True)
        for batch in batches:  # equal token counts: the mean over the union (one backward per forward)
            (model(torch.tensor(batch), labels=torch.tensor(batch)).loss / 2).backward()
        for rank, strategy in itertools.product(range(2), strategies):
            exchanged = load_file(tmp_path / f"rank{rank}-graph{number}-{strategy}.safetensors")
            for name in ("weights", "biases"):
                expected = model.model.get_parameter(name).grad.to_dense()
                torch.testing.assert_close(exchanged[name], expected, rtol=1e-6, atol=1e-7)


def test_sparse_gradient_accumulation_and_resume_are_exact(prepared, tmp_path):
    sparse = {"optimizer": "lazy_adamw", "sparse_gradients": True, "max_grad_norm": 0.5}
    whole = write_recipe(tmp_path / "a.json", prepared, tmp_path / "whole", max_steps=6, save_steps=3,
                         batch_size=8, **sparse)  # fmt: skip
    halves = write_recipe(tmp_path / "b.json", prepared, tmp_path / "halves", max_steps=6, save_steps=3,
                          batch_size=4, gradient_accumulation_steps=2, **sparse)  # fmt: skip
    for recipe in (whole, halves):
        result = run_train(recipe)
        assert result.returncode == 0, result.stderr[-3000:]
    assert_weights_close(final_weights(tmp_path / "whole"), final_weights(tmp_path / "halves"))
    resumed = write_recipe(tmp_path / "c.json", prepared, tmp_path / "resumed", max_steps=6, save_steps=3,
                           batch_size=8, **sparse)  # fmt: skip
    assert run_train(resumed, "--max-steps", "3").returncode == 0
    result = run_train(resumed, "--resume")
    assert result.returncode == 0 and "resumed from" in result.stdout, result.stderr[-3000:]
    straight, again = final_weights(tmp_path / "whole"), final_weights(tmp_path / "resumed")
    assert all(torch.equal(straight[name], again[name]) for name in straight)


def test_fsdp_on_two_cpu_processes_equals_ddp_and_saves_a_loadable_model(prepared, dense_ddp, tmp_path):
    from transformers import AutoModelForCausalLM

    recipe = write_recipe(tmp_path / "r.json", prepared, tmp_path / "out", max_steps=STEPS, save_steps=STEPS,
                          log_steps=1)  # fmt: skip
    result = launch(recipe, tmp_path, "--fsdp", "--debug-dir", str(tmp_path / "debug"))
    assert result.returncode == 0, result.stderr[-3000:]
    records = [json.loads((tmp_path / "debug" / f"rank{r}.json").read_text()) for r in range(2)]
    slots = BriLLMConfig.from_pretrained(prepared / "model").num_slots
    assert [r["local_weight_rows"] for r in records] == [-(-slots // 2), slots - -(-slots // 2)]  # really sharded
    sharded, ddp = final_weights(tmp_path / "out"), final_weights(dense_ddp / "out")
    assert_weights_close(ddp, sharded)
    code = {path.name: path.read_text() for path in (tmp_path / "out").glob("*.py")}  # BriLLM's, not torch's FSDP
    assert code == {path.name: path.read_text() for path in (dense_ddp / "out").glob("*.py")}
    model = AutoModelForCausalLM.from_pretrained(tmp_path / "out", trust_remote_code=True)
    assert torch.equal(model.model.weights, sharded["model.weights"])


@pytest.mark.parametrize(
    "launcher_args, env, message",
    [
        # FSDP config on a CPU machine without ACCELERATE_USE_CPU: two independent single-process runs.
        (["--num_processes", "2"], {"ACCELERATE_USE_CPU": "0"}, "runs alone, without a process group"),
        # The same with ACCELERATE_USE_CPU=1: Accelerate runs plain DDP instead of FSDP.
        (["--num_processes", "2"], {}, "asks for FSDP but Accelerate runs MULTI_CPU"),
    ],
)
def test_a_launch_that_falls_back_is_refused_in_one_line(prepared, tmp_path, launcher_args, env, message):
    recipe = write_recipe(tmp_path / "r.json", prepared, tmp_path / "out", max_steps=2)
    fsdp = REPO / "configuration" / "accelerate" / "fsdp.yaml"
    result = launch(recipe, tmp_path, config=fsdp, env=env, launcher_args=launcher_args)
    assert result.returncode != 0
    refusals = [line for line in result.stderr.splitlines() if line.startswith("error: refused:")]
    # Each process refuses (the launcher may stop the second before it gets there), in one line.
    assert refusals and all(message in line for line in refusals)
    assert not (tmp_path / "out" / "checkpoint-2").exists()


def test_launch_mismatch_names_each_fallback():
    assert launch_mismatch(2, "MULTI_CPU", False, {"WORLD_SIZE": "2", "LOCAL_RANK": "0"}) is None
    assert launch_mismatch(1, "NO", False, {}) is None
    single = {"ACCELERATE_MIXED_PRECISION": "no", "MASTER_PORT": "29500"}  # `accelerate launch --num_processes 2 --cpu`
    assert "only this one was started" in launch_mismatch(1, "NO", False, single)
    assert "asks for FSDP" in launch_mismatch(2, "MULTI_GPU", False, {"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true"})
    assert launch_mismatch(2, "FSDP", False, {"WORLD_SIZE": "2", "ACCELERATE_USE_FSDP": "true"}) is None
    assert "needs several processes" in launch_mismatch(1, "NO", True, {})
    assert "Accelerate runs 4" in launch_mismatch(4, "MULTI_GPU", False, {"WORLD_SIZE": "2"})


def test_recipes_refuse_combinations_that_cannot_train(tmp_path):
    from modeling_brillm.train import Recipe

    path = tmp_path / "r.yaml"
    for train, message in (
        ("optimizer: adam", "train.optimizer must be one of"),
        ("sparse_gradients: true", "adamw cannot take sparse gradients"),  # adamw is the default
        ("{optimizer: lazy_adamw, sparse_gradients: true, fsdp: true}", "does not work with FSDP"),
        ("{optimizer: sgd, sparse_gradients: true, weight_decay: 0.1}", "cannot decay weights"),
        ("sparse_gradients: 'yes'", "must be true or false"),
    ):
        path.write_text(f"train: {train}\n" if train.startswith("{") else f"train:\n  {train}\n")
        with pytest.raises(ValueError, match=message):
            Recipe.from_yaml(path)


def test_the_end_of_a_ddp_run_frees_the_reducer_before_the_process_group(tmp_path):
    """DDP's C++ reducer and logger go first, so the group dies through its Python handle, which releases the GIL
    while gloo's threads finish (with the reducer as the last holder, a 2-process run could hang at exit)."""
    from torch.nn.parallel import DistributedDataParallel

    from modeling_brillm.distributed import GradientTraffic, count_ddp_traffic, release_reducer

    store = torch.distributed.FileStore(str(tmp_path / "store"), 1)
    torch.distributed.init_process_group("gloo", store=store, rank=0, world_size=1)
    try:
        model = DistributedDataParallel(torch.nn.Linear(3, 3))
        count_ddp_traffic(model, GradientTraffic())
        model(torch.ones(2, 3)).sum().backward()
        assert {"reducer", "logger"} <= set(vars(model))
        release_reducer(model)
        assert not {"reducer", "logger"} & set(vars(model))
        plain = torch.nn.Linear(2, 2)
        release_reducer(plain)  # not DDP: left as it is
        assert plain(torch.ones(1, 2)).shape == (1, 2)
    finally:
        torch.distributed.destroy_process_group()
