"""Data-parallel and sharded training of BriLLM: gradient exchange sized by the batch, FSDP2, launch checks.

A batch touches slot 0 and the slabs of the nodes it passes through. With ``model.set_sparse_gradients(True)``
the gradients of ``weights`` and ``biases`` hold only those rows (a coalesced sparse COO tensor over slots,
built by the model's scoring backward), and `SparseGradientExchange` averages them over the data-parallel
processes by gathering every process's slot ids and rows, never the (P, d, d) tensor. DDP keeps the two small
dense parameters (``node_bias``, ``positions``) and is told to ignore the sparse ones (`ignore_in_ddp`).

`GradientTraffic` counts what each process hands to the collectives (its payload, in bytes), for dense DDP
(`count_ddp_traffic`, a comm hook) and for the sparse exchange alike, so the two can be compared step by step.

`shard_fully` and `full_state_dict` train with torch FSDP2 (``fully_shard``) directly, which also works on CPU
processes with gloo, where Accelerate silently runs an FSDP configuration as plain DDP.
"""

import os
from dataclasses import dataclass

import torch
import torch.distributed as dist

# ----------------------------------------------------------------------------------------------------------------
# Counting what crosses the wire


@dataclass
class GradientTraffic:
    """Bytes this process handed to gradient collectives (all-reduce buffers, all-gather inputs)."""

    sent: int = 0  # in all steps so far
    last_step: int = 0  # in the last finished step
    _step_start: int = 0

    def add(self, *tensors):
        self.sent += sum(t.numel() * t.element_size() for t in tensors)

    def end_step(self):
        self.last_step, self._step_start = self.sent - self._step_start, self.sent


def count_ddp_traffic(ddp_model, traffic):
    """Make a DDP model count every gradient bucket it all-reduces into ``traffic`` (then all-reduce as usual)."""
    from torch.distributed.algorithms.ddp_comm_hooks.default_hooks import allreduce_hook

    def hook(process_group, bucket):
        traffic.add(bucket.buffer())
        return allreduce_hook(process_group, bucket)

    ddp_model.register_comm_hook(state=None, hook=hook)


def release_reducer(ddp_model):
    """Free a DDP model's C++ reducer (and the logger that shares it) while Python still holds its process group.

    The reducer holds the process group. As the group's last holder it destroys the group with the GIL held, and
    gloo's destructor then waits for its worker thread, which may need the GIL to free the tensors of the last
    collective: the process never exits (seen at the end of a 2-process CPU run, torch 2.13). The group's Python
    handle (``ddp_model.process_group``) releases the GIL when it destroys the group. The model cannot train after
    this; anything but a DDP model is left as it is.
    """
    from torch.nn.parallel import DistributedDataParallel

    if isinstance(ddp_model, DistributedDataParallel):
        for name in ("logger", "reducer"):  # the logger holds the reducer too
            if name in vars(ddp_model):
                delattr(ddp_model, name)


# ----------------------------------------------------------------------------------------------------------------
# Sparse gradients across processes


def ignore_in_ddp(model, parameters):
    """Tell DDP (before it wraps ``model``) to leave ``parameters`` alone: their gradients are exchanged elsewhere.

    DDP's reducer cannot hold sparse gradients (``Cannot access storage of SparseTensorImpl``).
    """
    from torch.nn.parallel import DistributedDataParallel

    ids = {id(p) for p in parameters}
    names = [name for name, p in model.named_parameters() if id(p) in ids]
    DistributedDataParallel._set_params_and_buffers_to_ignore_for_model(model, names)


class SparseGradientExchange:
    """Averages the sparse row gradients of ``parameters`` over the processes of ``group``, in place.

    Every process first gathers the slot ids of every process's gradient (padded to the largest row count, one
    ``all_gather_single``), then the rows themselves by whichever of two ways puts fewer bytes on the wire (the
    choice is the same on every process, made from the ids they all hold):

    * ``"gather"``: all-gather every process's rows (padded) and sum them locally with one coalesce; a ring
      all-gather sends ``(W - 1) * rows`` per process. Best for few processes.
    * ``"all_reduce"``: scatter the rows into a dense buffer over the union of the touched slots and all-reduce it;
      a ring sends ``2 (W - 1) / W * union`` per process. Best when many processes touch overlapping slots.

    Each process ends with the same coalesced gradient (the layout the model produces), equal to the mean over
    processes, while what it sent grows with the slots the batches touched, never with the number of slots P. A
    parameter without a gradient takes part with no rows.

    Example (one process: the gradient stays what it was, coalesced):

    ```python
    >>> import torch, torch.distributed as dist
    >>> from modeling_brillm import BriLLMConfig, BriLLMForCausalLM
    >>> from modeling_brillm.distributed import SparseGradientExchange
    >>> dist.init_process_group("gloo", init_method="tcp://127.0.0.1:0", rank=0, world_size=1)
    >>> model = BriLLMForCausalLM(BriLLMConfig(vocab_size=16, hidden_size=4))
    >>> model.set_sparse_gradients(True)
    >>> ids = torch.tensor([[1, 2, 3, 4]])
    >>> model(ids, labels=ids).loss.backward()
    >>> exchange = SparseGradientExchange([model.model.weights, model.model.biases])
    >>> exchange.synchronize()
    >>> model.model.weights.grad.is_coalesced(), exchange.traffic.sent > 0
    (True, True)
    >>> dist.destroy_process_group()

    ```
    """

    STRATEGIES = ("auto", "gather", "all_reduce")

    def __init__(self, parameters, group=None, traffic=None, strategy="auto"):
        if strategy not in self.STRATEGIES:
            raise ValueError(f"strategy must be one of {self.STRATEGIES}; got {strategy!r}.")
        self.parameters = list(parameters)
        self.group = group
        self.traffic = traffic if traffic is not None else GradientTraffic()
        self.strategy = strategy

    def synchronize(self):
        world = dist.get_world_size(self.group)
        for param in self.parameters:
            param.grad = self._mean(param, world)

    def _mean(self, param, world):
        grad = param.grad
        if grad is None:
            rows, empty = torch.zeros(1, 0, dtype=torch.long), param.new_zeros(0, *param.shape[1:])
            grad = torch.sparse_coo_tensor(rows, empty, param.shape, check_invariants=False)
        if not grad.is_sparse:
            raise ValueError("SparseGradientExchange takes sparse gradients: call model.set_sparse_gradients(True).")
        grad = grad.coalesce()  # accumulated micro-batches add up here
        rows, values = grad.indices()[0], grad.values()  # (S,), (S, ...)
        counts = self._gather(torch.tensor([rows.numel()], device=rows.device))  # (world,)
        most = int(counts.max())
        all_rows = self._gather(_padded(rows, most))  # (world * most,)
        real = (torch.arange(most, device=rows.device)[None, :] < counts[:, None]).reshape(-1)  # not padding
        union = torch.unique(all_rows[real])  # (U,) sorted
        strategy = self.strategy
        if strategy == "auto":  # ring bytes per process: (W - 1) most rows against 2 (W - 1) / W union rows
            strategy = "gather" if world * most <= 2 * union.numel() else "all_reduce"
        if strategy == "gather":
            all_values = self._gather(_padded(values, most))  # (world * most, ...)
            total = torch.sparse_coo_tensor(all_rows[real][None], all_values[real], param.shape, check_invariants=False)
            total = total.coalesce()
            union, summed = total.indices()[0], total.values()
        else:
            summed = values.new_zeros(union.numel(), *values.shape[1:])
            summed[torch.searchsorted(union, rows)] = values
            self.traffic.add(summed)
            dist.all_reduce(summed, group=self.group)
        mean = summed / world
        return torch.sparse_coo_tensor(union[None], mean, param.shape, is_coalesced=True, check_invariants=False)

    def _gather(self, tensor):
        """Every process's ``tensor`` stacked along dimension 0: (world * n, ...)."""
        self.traffic.add(tensor)
        out = tensor.new_empty(dist.get_world_size(self.group) * tensor.shape[0], *tensor.shape[1:])
        dist.all_gather_single(out, tensor.contiguous(), group=self.group)
        return out


def _padded(tensor, length):
    """``tensor`` (n, ...) followed by zero rows up to ``length`` rows."""
    out = tensor.new_zeros(length, *tensor.shape[1:])
    out[: tensor.shape[0]] = tensor
    return out


def clip_grad_norm_(parameters, max_norm):
    """Scale the gradients so that their global 2-norm is at most ``max_norm``; sparse gradients included.

    ``torch.nn.utils.clip_grad_norm_`` refuses sparse gradients. Sparse ones are coalesced first (accumulated
    micro-batches may repeat a row), so the norm is that of the summed gradient. Returns the norm before clipping.
    """
    grads = []
    for param in parameters:
        if param.grad is not None and param.grad.is_sparse:
            param.grad = param.grad.coalesce()
        if param.grad is not None:
            grads.append(param.grad)
    norms = [torch.linalg.vector_norm(g.values() if g.is_sparse else g, dtype=torch.float32) for g in grads]
    total = torch.linalg.vector_norm(torch.stack(norms)) if norms else torch.tensor(0.0)
    scale = (max_norm / (total + 1e-6)).clamp(max=1.0)
    for grad in grads:
        (grad.values() if grad.is_sparse else grad).mul_(scale.to(grad.dtype))
    return total


# ----------------------------------------------------------------------------------------------------------------
# FSDP2


def shard_fully(model, reshard_after_forward=True):
    """Shard a `BriLLMForCausalLM` with FSDP2 (``fully_shard``) over all processes: the layout of
    ``configuration/accelerate/fsdp.yaml``, the base model and the root each one FSDP unit, parameters sharded on
    dimension 0 (the slots). Needs an initialised process group; works on CPU with gloo.

    With ``reshard_after_forward=True`` every read of a parameter must happen inside the forward of the module
    that owns it.
    """
    from torch.distributed.device_mesh import init_device_mesh
    from torch.distributed.fsdp import fully_shard

    device = next(model.parameters()).device
    mesh = init_device_mesh(device.type, (dist.get_world_size(),))
    fully_shard(model.model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    fully_shard(model, mesh=mesh, reshard_after_forward=reshard_after_forward)
    return model


def full_state_dict(model):
    """The whole state dict of an FSDP2-sharded model as plain CPU tensors on every process (a collective)."""
    from torch.distributed.tensor import DTensor

    return {
        name: (value.full_tensor() if isinstance(value, DTensor) else value).detach().cpu()
        for name, value in model.state_dict().items()
    }


# ----------------------------------------------------------------------------------------------------------------
# No silent fallbacks


def launch_mismatch(num_processes, distributed_type, fsdp_requested, environ=None):
    """Why the running distributed state differs from what the launch asked for, in one line; None if it fits.

    ``num_processes`` and ``distributed_type`` (its name, e.g. ``"MULTI_CPU"``) describe what Accelerate set up;
    ``fsdp_requested`` is whether the recipe asks to shard with FSDP2 itself. The launch's wishes are read from
    the environment the launcher (``accelerate launch``, ``torchrun``) set.

    Example:

    ```python
    >>> print(launch_mismatch(1, "NO", False, {"WORLD_SIZE": "2", "LOCAL_RANK": "1"}))  # doctest: +ELLIPSIS
    the launcher started 2 processes (WORLD_SIZE=2) but this one runs alone, without a process group: ...
    >>> launch_mismatch(2, "MULTI_CPU", False, {"WORLD_SIZE": "2"}) is None
    True

    ```
    """
    environ = os.environ if environ is None else environ
    world = int(environ.get("WORLD_SIZE", "1") or 1)
    fsdp_config = environ.get("ACCELERATE_USE_FSDP", "").lower() in ("1", "true", "yes")
    launched_by_accelerate = "ACCELERATE_MIXED_PRECISION" in environ
    if world > 1 and num_processes == 1:
        return (
            f"the launcher started {world} processes (WORLD_SIZE={world}) but this one runs alone, without a process "
            "group: they would all write one output folder. On CPU launch with ACCELERATE_USE_CPU=1 and "
            "configuration/accelerate/cpu-2proc.yaml."
        )
    if world != num_processes:
        return f"the launcher started {world} processes (WORLD_SIZE) but Accelerate runs {num_processes}."
    if launched_by_accelerate and num_processes == 1 and "MASTER_PORT" in environ and "LOCAL_RANK" not in environ:
        return (
            "the accelerate config asks for several processes but only this one was started (accelerate's single-"
            "process launcher): on CPU launch with ACCELERATE_USE_CPU=1 and configuration/accelerate/cpu-2proc.yaml."
        )
    if fsdp_config and distributed_type != "FSDP":
        return (
            f"the accelerate config asks for FSDP but Accelerate runs {distributed_type} (it does so without a word on "
            "CPU): on CPU shard with FSDP2 directly instead, `--fsdp` with configuration/accelerate/cpu-2proc.yaml."
        )
    if fsdp_requested and distributed_type == "FSDP":
        return "--fsdp shards with FSDP2 itself: launch it with a data-parallel accelerate config, not an FSDP one."
    if fsdp_requested and num_processes == 1:
        return "--fsdp needs several processes (a process group): launch with accelerate launch or torchrun."
    return None


__all__ = [
    "GradientTraffic",
    "SparseGradientExchange",
    "clip_grad_norm_",
    "count_ddp_traffic",
    "full_state_dict",
    "ignore_in_ddp",
    "launch_mismatch",
    "shard_fully",
]
