"""One data-parallel step of sparse-gradient BriLLMs, run by `test_distributed.py` under torchrun (gloo).

    torchrun --nproc_per_node 2 tests/distributed_worker.py TASK.json

TASK.json names ``batches`` (one list of token-id rows per rank), ``graphs`` (``[row_ptr, col_idx]`` per model,
all of one vocabulary) and ``output`` (a folder). For every graph and exchange strategy this process builds the
same seeded model, backpropagates its own batch with sparse gradients, averages them with
`SparseGradientExchange` and writes the averaged gradients (dense) and the bytes it sent to
``output/rank<r>-graph<g>-<strategy>.safetensors`` / ``.json``.
"""

import itertools
import json
import sys
from pathlib import Path

import torch
import torch.distributed as dist
from safetensors.torch import save_file

from modeling_brillm import BriLLMConfig, BriLLMForCausalLM
from modeling_brillm.distributed import SparseGradientExchange


def main(task_path):
    task = json.loads(Path(task_path).read_text())
    dist.init_process_group("gloo")
    rank = dist.get_rank()
    output = Path(task["output"])
    ids = torch.tensor(task["batches"][rank])
    strategies = ("gather", "all_reduce")
    for (number, (row_ptr, col_idx)), strategy in itertools.product(enumerate(task["graphs"]), strategies):
        config = BriLLMConfig(vocab_size=len(row_ptr) - 1, hidden_size=task["hidden_size"], num_slots=1 + len(col_idx))
        torch.manual_seed(0)
        model = BriLLMForCausalLM.from_graph(config, torch.tensor(row_ptr), torch.tensor(col_idx))
        model.set_sparse_gradients(True)
        model(ids, labels=ids).loss.backward()
        exchange = SparseGradientExchange([model.model.weights, model.model.biases], strategy=strategy)
        exchange.synchronize()
        exchange.traffic.end_step()
        grads = {name: model.model.get_parameter(name).grad.to_dense() for name in ("weights", "biases")}
        save_file(grads, output / f"rank{rank}-graph{number}-{strategy}.safetensors")
        report = {"bytes": exchange.traffic.last_step, "coalesced": model.model.weights.grad.is_coalesced()}
        (output / f"rank{rank}-graph{number}-{strategy}.json").write_text(json.dumps(report))
    dist.destroy_process_group()


if __name__ == "__main__":
    main(sys.argv[1])
