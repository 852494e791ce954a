"""The Triton kernels (modeling_brillm/kernels_brillm.py) on the CPU, under the Triton interpreter.

``TRITON_INTERPRET=1`` must be set before triton is imported, so every kernel check runs in a subprocess
(tests/kernel_checks.py) with ``TRITON_INTERPRET=1 BRILLM_KERNELS=triton``; this process never changes its own
environment or torch state. The interpreter costs milliseconds per program and per operation: shapes stay tiny.
Tolerances: float32 <= 1e-5 relative to the largest entry; bf16 weights: the loss 1e-5 (the kernel reads bf16 and
computes in float32, like PyTorch), gradients 1e-2 (they are stored in bf16, 8 bits of mantissa).
"""

import json
import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

pytest.importorskip("triton", reason="CI installs triton==3.9.0 (requirements-ci.txt); the kernels need it")

from kernel_checks import make_model, training_batch  # noqa: E402

from modeling_brillm.kernels_brillm import kernels_wanted  # noqa: E402

TESTS = Path(__file__).resolve().parent
FP32 = 1e-5


def interpreted(*checks, timeout=600):
    """Run ``(name, kwargs)`` checks of kernel_checks.py under the Triton interpreter; their result dicts."""
    env = dict(os.environ, TRITON_INTERPRET="1", BRILLM_KERNELS="triton")
    env["PYTHONPATH"] = os.pathsep.join([str(TESTS.parent), env.get("PYTHONPATH", "")])
    args = [a for name, kwargs in checks for a in (name, json.dumps(kwargs))]
    done = subprocess.run(
        [sys.executable, str(TESTS / "kernel_checks.py"), *args], capture_output=True, text=True, env=env,
        cwd=TESTS, timeout=timeout,
    )  # fmt: skip
    assert done.returncode == 0, f"kernel checks failed:\n{done.stdout[-3000:]}\n{done.stderr[-6000:]}"
    line = [line for line in done.stdout.splitlines() if line.startswith("RESULTS ")][-1]
    return json.loads(line[len("RESULTS ") :])


EDGE_NLL = [{"d": 8, "kind": "sparse"}, {"d": 16, "kind": "sparse", "seed": 3}, {"d": 32, "kind": "dense", "V": 10}]
FLOW = [{"d": 8}, {"d": 16, "seed": 1}, {"d": 32, "seed": 2}]
STEP = [
    {"d": 8, "kind": "sparse", "padding": True, "sparse": False},
    {"d": 16, "kind": "sparse", "padding": True, "sparse": True, "seed": 1},
    {"d": 32, "kind": "dense", "padding": False, "sparse": False, "V": 8},
    {"d": 8, "kind": "sparse", "padding": False, "sparse": True, "seed": 2},
]
SHAPES = [{"sources": 3, "T": 32}, {"sources": 24, "T": 32}, {"sources": 24, "T": 128}]
COUNTS = [{"backend": backend, **shape} for backend in ("triton", "torch") for shape in SHAPES]
CHECKS = (
    [("check_edge_nll", case) for case in EDGE_NLL]
    + [("check_signal_flow", case) for case in FLOW]
    + [("check_training_step", case) for case in STEP]
    + [("check_bf16_training_step", {}), ("check_no_grad_kernel", {})]
    + [("count_operators", case) for case in COUNTS]
    + [("time_recurrence", {"T": 64, "repeats": 3}), ("time_recurrence", {"T": 256, "repeats": 3})]
)


@pytest.fixture(scope="module")
def results():
    """Every kernel check, run once in one interpreted subprocess (importing torch and triton costs seconds):
    ``{check name: [result per case, in order]}``."""
    found = {}
    for (name, _), result in zip(CHECKS, interpreted(*CHECKS)):
        found.setdefault(name, []).append(result)
    return found


def test_switch_reads_the_environment(monkeypatch):
    cpu = torch.device("cpu")
    monkeypatch.setenv("BRILLM_KERNELS", "torch")
    assert kernels_wanted(cpu) is False
    monkeypatch.delenv("BRILLM_KERNELS")
    assert kernels_wanted(cpu) is False  # automatic: CUDA only
    monkeypatch.setenv("BRILLM_KERNELS", "cuda-please")
    with pytest.raises(ValueError, match="BRILLM_KERNELS must be"):
        kernels_wanted(cpu)
    monkeypatch.setenv("BRILLM_KERNELS", "triton")
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(RuntimeError, match="TRITON_INTERPRET=1"):
        kernels_wanted(cpu)


def test_scoring_loss_kernels_equal_the_reference(results):
    """edge_nll: the exact full-vocabulary NLL and its signal, pe, weight and bias gradients, dense and sparse layout,
    on ragged sparse graphs (an empty row, a full row) and a dense graph, d in {8, 16, 32}."""
    for case, result in zip(EDGE_NLL, results["check_edge_nll"]):
        assert result.pop("sparse_layout_ok"), case  # slot 0 + the touched slabs, coalesced, in slot order
        assert max(result.values()) <= FP32, (case, result)


def test_recurrence_kernel_equals_the_loop(results):
    """signal_flow against the position loop: left and right padding, a hole, a running state; every gradient."""
    for case, result in zip(FLOW, results["check_signal_flow"]):
        assert max(result.values()) <= FP32, (case, result)


def test_training_step_on_kernels_equals_pytorch(results):
    """A model's training step with BRILLM_KERNELS=triton against =torch: the loss and the gradients of weights,
    biases, node_bias and positions, with and without padding, dense and sparse gradients."""
    for case, result in zip(STEP, results["check_training_step"]):
        assert result.pop("kernel_logits_none"), case  # the kernel loss never builds (B, T, V) logits
        assert max(result.values()) <= FP32, (case, result)


def test_bf16_weights_and_the_no_grad_kernel(results):
    """bf16 weights on the kernel path equal float32 scoring of the same values; the existing no-grad scoring kernel
    (eval logits, greedy generation; float32 and bf16 weights) equals PyTorch scoring."""
    (bf16,), (no_grad,) = results["check_bf16_training_step"], results["check_no_grad_kernel"]
    assert bf16.pop("grad_dtype") == "torch.bfloat16"
    assert bf16.pop("loss") <= FP32, bf16
    assert max(bf16.values()) <= 1e-2, bf16
    assert no_grad.pop("kernel_used")
    assert no_grad.pop("float32_generate_equal") and no_grad.pop("bfloat16_generate_equal")
    assert max(no_grad.values()) <= FP32, no_grad


def test_kernel_step_launches_do_not_grow_with_sources_or_length(results):
    """Operators (compute ops + kernel launches) of one training step: constant on the kernel path for few or many
    distinct sources and for T = 32 or 128; the PyTorch path, counted the same way, grows with both."""
    kernel, plain = results["count_operators"][:3], results["count_operators"][3:]
    assert kernel[0]["distinct_sources"] <= 3 < 15 < kernel[1]["distinct_sources"]
    assert len({r["total"] for r in kernel}) == 1, kernel
    assert kernel[0]["launches"] == 4  # scoring forward and backward, recurrence forward and backward
    assert plain[0]["total"] < plain[1]["total"] < plain[2]["total"], plain


def test_recurrence_kernel_is_linear_in_length(results):
    """Forward + backward of the recurrence kernel at B = 8, d = 32: four times the length costs at most eight times
    the time, best of 3 each (linear costs four, a quadratic backward sixteen: eight sits between them on a log scale,
    so a noisy shared machine does not fail a linear kernel). Interpreted, so T = 64 and 256 stand for 256 and 1024."""
    short, long = results["time_recurrence"]
    assert long["seconds"] <= 8 * short["seconds"], (short, long)


def test_bf16_training_stays_within_1e2_of_float32(monkeypatch):
    """50 steps of AdamW on fp32 master weights with the model in bf16 (scoring reads bf16 slabs, accumulates in
    float32) against the same run in float32: the losses agree to 1e-2 at every step. PyTorch path (the kernel path
    computes the same step: test_bf16_weights_and_the_no_grad_kernel)."""
    monkeypatch.setenv("BRILLM_KERNELS", "torch")
    ids, mask, labels = training_batch(24, 4, 12, seed=1, padding=True)
    curves = {}
    for dtype in (torch.float32, torch.bfloat16):
        model = make_model(24, 16, "sparse", seed=0)
        master = [p.detach().clone() for p in model.parameters()]
        model.to(dtype)
        optimizer = torch.optim.AdamW(master, lr=1e-2)
        losses = []
        for _ in range(50):
            loss = model(ids, attention_mask=mask, labels=labels).loss
            loss.backward()
            for weight, param in zip(master, model.parameters()):
                weight.grad = param.grad.float()
                param.grad = None
            optimizer.step()
            with torch.no_grad():
                for weight, param in zip(master, model.parameters()):
                    param.copy_(weight)
            losses.append(float(loss.detach()))
        curves[dtype] = torch.tensor(losses)
    assert curves[torch.float32][-1] < curves[torch.float32][0] - 0.1  # it learns
    assert float((curves[torch.bfloat16] - curves[torch.float32]).abs().max()) <= 1e-2
