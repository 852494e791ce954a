"""Shared pytest fixtures. Keep additions small and independent of each other."""

import json
import subprocess
import sys
from pathlib import Path

import pytest
import torch

REPO_ROOT = Path(__file__).resolve().parent.parent
FIXTURE_DIR = REPO_ROOT / "tests" / "fixtures" / "official-tiny"
CONVERTER = REPO_ROOT / "conversion" / "convert_official_checkpoint.py"


def convert_reference(output, *extra_args, checkpoint=None, vocab=None, frequencies=None):
    """Run the converter CLI (on the official-tiny files unless others are given); returns the CompletedProcess."""
    command = [
        sys.executable,
        str(CONVERTER),
        "--checkpoint", str(checkpoint or FIXTURE_DIR / "model.bin"),
        "--vocab", str(vocab or FIXTURE_DIR / "vocab.json"),
        "--frequencies", str(frequencies or FIXTURE_DIR / "word_frequency.json"),
        "--output", str(output),
        *extra_args,
    ]  # fmt: skip
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)


def run_converter(output, *extra_args):
    """Convert the official-tiny fixture into ``output`` (must succeed); returns ``output``."""
    result = convert_reference(output, *extra_args)
    assert result.returncode == 0, f"converter failed ({result.returncode}):\n{result.stdout}\n{result.stderr}"
    return Path(output)


@pytest.fixture(scope="session")
def fixture_dir():
    """The official-tiny reference fixture folder (model.bin, vocab.json, word_frequency.json, expected outputs)."""
    return FIXTURE_DIR


@pytest.fixture(scope="session")
def converted_fixture(tmp_path_factory):
    """The official-tiny fixture converted (float32, default position shift) into a ``save_pretrained`` folder.

    Shared by the whole session: treat it as read-only (copy it before editing).
    """
    return run_converter(tmp_path_factory.mktemp("converted") / "official-tiny")


@pytest.fixture(scope="session")
def fixture_converter():
    """``run_converter(output, *extra_cli_args)``: convert the fixture with other options (e.g. ``--dtype bfloat16``)."""
    return run_converter


@pytest.fixture(scope="session")
def reference_converter():
    """``convert_reference(output, *extra_cli_args, checkpoint=, vocab=, frequencies=)``: run the converter on any
    reference files and get the CompletedProcess (for tests of its refusals)."""
    return convert_reference


def write_reference_files(folder, tokens, owned_fraction=0.3, hidden_size=4, seed=0):
    """Reference-format ``model.bin``, ``vocab.json`` and ``word_frequency.json`` for ``tokens`` (random weights)."""
    folder.mkdir(parents=True, exist_ok=True)
    generator = torch.Generator().manual_seed(seed)
    V = len(tokens)
    owned = torch.rand(V, V, generator=generator) < owned_fraction
    counts = owned.long() * torch.randint(1, 50, (V, V), generator=generator)
    P = 1 + int((counts > 0).sum())
    state = {
        "positions": torch.randn(1, 512, 1, generator=generator),
        "weights": torch.rand(P, hidden_size, hidden_size, generator=generator) - 0.5,
        "biases": torch.rand(P, 1, hidden_size, generator=generator) - 0.5,
        "node_bias": torch.rand(V, 1, hidden_size, generator=generator) - 0.5,
    }
    torch.save(state, folder / "model.bin")
    (folder / "vocab.json").write_text(json.dumps({t: i for i, t in enumerate(tokens)}, ensure_ascii=False))
    frequencies = {
        s: dict(sorted(((t, int(counts[i, j])) for j, t in enumerate(tokens)), key=lambda kv: -kv[1]))
        for i, s in enumerate(tokens)
    }
    (folder / "word_frequency.json").write_text(json.dumps(frequencies, ensure_ascii=False))
    return folder / "model.bin", folder / "vocab.json", folder / "word_frequency.json"


@pytest.fixture(scope="session")
def reference_files():
    """``write_reference_files(folder, tokens, owned_fraction=, hidden_size=, seed=)``: a reference-format model."""
    return write_reference_files
