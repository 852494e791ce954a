"""An AdamW for BriLLM's sparse gradients: only the slots a batch touched are read and written.

With ``model.set_sparse_gradients(True)`` the gradients of ``weights`` and ``biases`` hold slot 0 and the slabs of
the nodes a batch passed through, a few percent of all slots. `LazyAdamW` updates exactly those rows (and runs the
plain AdamW step on dense gradients, e.g. ``node_bias`` and ``positions``), so a step costs what the batch touched
instead of three full passes over every parameter. ``torch.optim.SGD`` also takes sparse gradients as they are.
"""

import math

import torch


class LazyAdamW(torch.optim.Optimizer):
    r"""AdamW that updates only the rows present in a sparse gradient ("lazy" Adam).

    On a dense gradient it is AdamW. On a sparse COO gradient (rows along dimension 0) it applies AdamW's update to
    the rows the gradient holds and leaves every other row, with its moments, as it is: untouched rows are neither
    decayed nor moved, and their moments do not decay either (the bias correction uses the parameter's step
    count). After a step in which every row is touched it equals ``torch.optim.AdamW``. Rows are processed in
    chunks of ``chunk_rows``, which bounds the temporary memory.

    Args:
        params: parameters or parameter groups, as for any optimizer.
        lr (`float`, defaults to 1e-3), betas (`tuple`, defaults to (0.9, 0.999)), eps (`float`, defaults to 1e-8),
        weight_decay (`float`, defaults to 0.01): as in ``torch.optim.AdamW``.
        chunk_rows (`int`, defaults to 4096): rows gathered, updated and scattered back at a time.

    Example:

    ```python
    >>> import torch
    >>> from modeling_brillm import BriLLMConfig, BriLLMForCausalLM
    >>> from modeling_brillm.optimization import LazyAdamW
    >>> model = BriLLMForCausalLM(BriLLMConfig(vocab_size=16, hidden_size=4))
    >>> model.set_sparse_gradients(True)
    >>> optimizer = LazyAdamW(model.parameters(), lr=1e-2)
    >>> ids = torch.tensor([[1, 2, 3, 4]])
    >>> model(ids, labels=ids).loss.backward()
    >>> model.model.weights.grad.is_sparse
    True
    >>> optimizer.step()

    ```
    """

    def __init__(self, params, lr=1e-3, betas=(0.9, 0.999), eps=1e-8, weight_decay=0.01, chunk_rows=4096):
        if lr < 0 or eps < 0 or weight_decay < 0 or not all(0 <= beta < 1 for beta in betas) or chunk_rows < 1:
            raise ValueError(
                f"LazyAdamW needs lr, eps, weight_decay >= 0, betas in [0, 1) and chunk_rows >= 1; got lr={lr}, "
                f"betas={betas}, eps={eps}, weight_decay={weight_decay}, chunk_rows={chunk_rows}."
            )
        defaults = dict(lr=lr, betas=betas, eps=eps, weight_decay=weight_decay, chunk_rows=chunk_rows)
        super().__init__(params, defaults)

    @torch.no_grad()
    def step(self, closure=None):
        loss = None
        if closure is not None:
            with torch.enable_grad():
                loss = closure()
        for group in self.param_groups:
            for param in group["params"]:
                if param.grad is not None:
                    self._step(param, group)
        return loss

    def _step(self, param, group):
        state = self.state[param]
        if not state:
            state["step"] = 0
            state["exp_avg"] = torch.zeros_like(param, memory_format=torch.preserve_format)
            state["exp_avg_sq"] = torch.zeros_like(param, memory_format=torch.preserve_format)
        state["step"] += 1
        tensors = (param, state["exp_avg"], state["exp_avg_sq"])
        grad = param.grad
        if not grad.is_sparse:
            _adamw(*tensors, grad, state["step"], group)
            return
        if not _has_unique_rows(grad):  # e.g. gradients accumulated over several batches
            grad = grad.coalesce()
        rows, values = grad._indices()[0], grad._values()
        for start in range(0, rows.numel(), group["chunk_rows"]):
            chunk = rows[start : start + group["chunk_rows"]]
            selected = [t.index_select(0, chunk) for t in tensors]
            _adamw(*selected, values[start : start + group["chunk_rows"]], state["step"], group)
            for tensor, rows_now in zip(tensors, selected):
                tensor.index_copy_(0, chunk, rows_now)


def _adamw(param, exp_avg, exp_avg_sq, grad, step, group):
    """One AdamW update, in place (``torch.optim.AdamW``'s single-tensor formula)."""
    beta1, beta2 = group["betas"]
    grad = grad.to(param.dtype)
    param.mul_(1 - group["lr"] * group["weight_decay"])
    exp_avg.lerp_(grad, 1 - beta1)
    exp_avg_sq.mul_(beta2).addcmul_(grad, grad, value=1 - beta2)
    step_size = group["lr"] / (1 - beta1**step)
    denominator = (exp_avg_sq.sqrt() / math.sqrt(1 - beta2**step)).add_(group["eps"])
    param.addcdiv_(exp_avg, denominator, value=-step_size)


def _has_unique_rows(grad):
    """Whether a sparse gradient holds each row once: BriLLM's are built that way, though flagged uncoalesced
    (autograd re-wraps them), and checking the rows is far cheaper than coalescing the values."""
    if grad.is_coalesced():
        return True
    rows = grad._indices()[0]
    return bool((rows[1:] > rows[:-1]).all())


__all__ = ["LazyAdamW"]
