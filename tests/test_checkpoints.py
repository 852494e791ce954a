"""Checkpoints: save/load round trips, remote code, native Auto registration, bad checkpoints, bfloat16.

The remote-code test runs a fresh Python process in which the `modeling_brillm` package cannot be imported
(offline, temporary ``HF_HOME``) and compares its results with this process's.
"""

import filecmp
import json
import os
import shutil
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors import safe_open
from safetensors.torch import load_file, save_file
from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

import modeling_brillm
from modeling_brillm import BriLLMConfig, BriLLMForCausalLM, BriLLMModel

PACKAGE_DIR = Path(modeling_brillm.__file__).resolve().parent
REPO_ROOT = Path(__file__).resolve().parent.parent
FLOAT_KEYS = ("model.weights", "model.biases", "model.node_bias", "model.positions")
GRAPH_DTYPES = {"model.graph.row_ptr": torch.int64, "model.graph.col_idx": torch.int32}
FIXTURE_SLOTS = 1668  # slots of the official-tiny fixture: 1 shared + 1667 owned edges


# ------------------------------------------------------------------------------------------------------------
# Helpers


def random_sparse_model(vocab_size=12, hidden_size=4, density=0.4, seed=0):
    """A small random model on a random sparse slot map (node 3 owns no edge at all)."""
    generator = torch.Generator().manual_seed(seed)
    owned = torch.rand(vocab_size, vocab_size, generator=generator) < density
    owned[3] = False
    row_ptr = torch.cat([torch.zeros(1, dtype=torch.int64), owned.sum(1).cumsum(0)])
    col_idx = owned.nonzero()[:, 1].to(torch.int32)  # row-major, so sorted within each row
    config = BriLLMConfig(
        vocab_size=vocab_size,
        hidden_size=hidden_size,
        max_position_embeddings=16,
        num_slots=1 + int(owned.sum()),
    )
    torch.manual_seed(seed)
    model = BriLLMForCausalLM.from_graph(config, row_ptr, col_idx).eval()
    with torch.no_grad():  # non-constant positional logits, so that losing them on load would show
        model.model.positions.normal_(0.0, 0.5, generator=generator)
    assert 1 < config.num_slots < 1 + vocab_size**2
    return model


def saved_tensors(folder):
    """Every tensor of every safetensors file in ``folder`` (sharded or not)."""
    files = sorted(Path(folder).glob("*.safetensors"))
    assert files, f"no safetensors file in {folder}"
    tensors = {}
    for path in files:
        tensors.update(load_file(path))
    return tensors


def rewrite_tensors(folder, edit):
    """Apply ``edit(tensors)`` to ``folder/model.safetensors`` in place, keeping its metadata."""
    path = Path(folder) / "model.safetensors"
    with safe_open(path, "pt") as f:
        metadata = f.metadata()
    tensors = {name: tensor.clone() for name, tensor in load_file(path).items()}
    edit(tensors)
    save_file(tensors, path, metadata=metadata)


def edit_config(folder, **changes):
    path = Path(folder) / "config.json"
    config = json.loads(path.read_text())
    config.update(changes)
    path.write_text(json.dumps(config, indent=2))


def assert_same_state(expected, actual):
    expected, actual = expected.state_dict(), actual.state_dict()
    assert sorted(expected) == sorted(actual)
    for name, tensor in expected.items():
        assert actual[name].dtype == tensor.dtype, name
        assert torch.equal(actual[name], tensor), name


def logits_of(model, input_ids, **kwargs):
    with torch.no_grad():
        return model(input_ids, **kwargs).logits


@pytest.fixture(scope="module")
def fixture_inputs(fixture_dir):
    """The fixture's 3 x 8 token ids (sequence 1 ends in two [PAD] tokens)."""
    return torch.tensor(json.loads((fixture_dir / "fixture.json").read_text())["inputs"]["token_ids"])


@pytest.fixture
def checkpoint_copy(converted_fixture, tmp_path):
    """A private, editable copy of the converted fixture."""
    return Path(shutil.copytree(converted_fixture, tmp_path / "copy"))


# ------------------------------------------------------------------------------------------------------------
# 1. save_pretrained -> from_pretrained


def test_round_trip_random_sparse_model(tmp_path):
    model = random_sparse_model()
    folder = tmp_path / "sparse"
    model.save_pretrained(folder)

    assert (folder / "model.safetensors").is_file()
    assert not list(folder.glob("*.bin")), "weights must be saved as safetensors only"
    config = json.loads((folder / "config.json").read_text())
    assert config["model_type"] == "brillm"
    assert config["num_slots"] == model.config.num_slots
    assert set(config["auto_map"]) == {"AutoConfig", "AutoModel", "AutoModelForCausalLM"}
    saved = saved_tensors(folder)
    assert sorted(saved) == sorted(model.state_dict())
    for name, dtype in GRAPH_DTYPES.items():
        assert saved[name].dtype == dtype
        assert torch.equal(saved[name], model.state_dict()[name])
    assert saved["model.graph.col_idx"].shape == (model.config.num_slots - 1,)

    loaded = BriLLMForCausalLM.from_pretrained(folder)
    assert type(loaded) is BriLLMForCausalLM
    assert not loaded.training
    assert loaded.config.num_slots == model.config.num_slots
    assert loaded.config.vocab_size == model.config.vocab_size
    assert_same_state(model, loaded)

    ids = torch.tensor([[1, 3, 5, 3, 7, 2], [4, 4, 9, 0, 11, 3]])
    mask = torch.tensor([[1, 1, 1, 1, 1, 1], [0, 0, 1, 1, 1, 1]])
    assert torch.equal(logits_of(model, ids), logits_of(loaded, ids))
    assert torch.equal(logits_of(model, ids, attention_mask=mask), logits_of(loaded, ids, attention_mask=mask))
    greedy = dict(max_new_tokens=6, do_sample=False, attention_mask=mask)
    assert torch.equal(model.generate(ids, **greedy), loaded.generate(ids, **greedy))


def test_round_trip_converted_fixture(converted_fixture, fixture_dir, fixture_inputs, tmp_path):
    names = {path.name for path in converted_fixture.iterdir()}
    assert {"config.json", "model.safetensors", "configuration_brillm.py", "modeling_brillm.py"} <= names
    assert not list(converted_fixture.glob("*.bin"))

    model = BriLLMForCausalLM.from_pretrained(converted_fixture)
    assert model.config.num_slots == FIXTURE_SLOTS
    # The converted tensors are the reference ones, and the slot map is the reference one.
    reference = torch.load(fixture_dir / "model.bin", map_location="cpu", weights_only=True)
    state = model.state_dict()
    for name in FLOAT_KEYS:
        assert torch.equal(state[name], reference[name.removeprefix("model.")]), name
    fixture = json.loads((fixture_dir / "fixture.json").read_text())
    slot_matrix = torch.tensor(fixture["slot_matrix"])
    sources, targets = torch.meshgrid(torch.arange(64), torch.arange(64), indexing="ij")
    assert torch.equal(model.get_edge_graph().slots(sources, targets), slot_matrix)
    # and it reproduces the reference forward
    expected = load_file(fixture_dir / "expected_outputs.safetensors")["full_logits"]
    logits = logits_of(model, fixture_inputs)
    torch.testing.assert_close(logits[:, :-1], expected, rtol=1e-5, atol=1e-5)

    folder = tmp_path / "resaved"
    model.save_pretrained(folder)
    saved = saved_tensors(folder)
    for name, dtype in GRAPH_DTYPES.items():
        assert saved[name].dtype == dtype
        assert torch.equal(saved[name], state[name])
    reloaded = BriLLMForCausalLM.from_pretrained(folder)
    assert_same_state(model, reloaded)
    assert torch.equal(logits_of(reloaded, fixture_inputs), logits)


# ------------------------------------------------------------------------------------------------------------
# 2. Remote code, in a process where the package cannot be imported


REMOTE_SCRIPT = textwrap.dedent(
    '''
    import importlib.abc
    import json
    import sys
    from pathlib import Path


    class HidePackage(importlib.abc.MetaPathFinder):
        """The brillm package is absent here, however it is installed (an editable install adds a finder)."""

        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "modeling_brillm":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)
            return None


    sys.meta_path.insert(0, HidePackage())
    checkpoint, bad_checkpoint, repo_root, output = sys.argv[1:5]
    repo_root = Path(repo_root).resolve()
    assert not any(Path(p or ".").resolve() == repo_root for p in sys.path), sys.path
    try:
        import modeling_brillm  # noqa: F401
    except ModuleNotFoundError:
        pass
    else:
        raise SystemExit("modeling_brillm is importable in the remote-code process")

    import torch
    from transformers import AutoConfig, AutoModel, AutoModelForCausalLM

    ids = torch.tensor(json.loads(sys.argv[5]))
    config = AutoConfig.from_pretrained(checkpoint, trust_remote_code=True)
    lm = AutoModelForCausalLM.from_pretrained(checkpoint, trust_remote_code=True)
    base = AutoModel.from_pretrained(checkpoint, trust_remote_code=True)
    with torch.no_grad():
        logits = lm(ids).logits
        base_out = base(ids)
        generated = lm.generate(ids[:2, :5], attention_mask=torch.ones_like(ids[:2, :5]), max_new_tokens=8, do_sample=False)
    try:
        AutoModelForCausalLM.from_pretrained(bad_checkpoint, trust_remote_code=True)
        bad_error = None
    except Exception as error:  # the test checks the type
        bad_error = f"{type(error).__name__}: {error}"
    torch.save(
        {
            "classes": {
                "config": [type(config).__name__, type(config).__module__],
                "lm": [type(lm).__name__, type(lm).__module__],
                "base": [type(base).__name__, type(base).__module__],
            },
            "num_slots": config.num_slots,
            "logits": logits,
            "generated": generated,
            "base_keys": list(base_out.keys()),
            "base_logits": base_out.logits,
            "last_hidden_state": base_out.last_hidden_state,
            "bad_error": bad_error,
            "package_modules": sorted(name for name in sys.modules if name.split(".")[0] == "modeling_brillm"),
        },
        output,
    )
    '''
)


def test_remote_code_without_the_package(converted_fixture, fixture_inputs, tmp_path):
    # The code files in the checkpoint are the package's own modules, byte for byte.
    code_files = sorted(path.name for path in converted_fixture.glob("*.py"))
    assert {"configuration_brillm.py", "modeling_brillm.py"} <= set(code_files)
    for name in code_files:
        assert filecmp.cmp(converted_fixture / name, PACKAGE_DIR / name, shallow=False), name

    bad = Path(shutil.copytree(converted_fixture, tmp_path / "bad"))
    edit_config(bad, num_slots=FIXTURE_SLOTS - 100)
    workdir = tmp_path / "work"
    workdir.mkdir()
    script = workdir / "remote.py"
    script.write_text(REMOTE_SCRIPT)
    output = workdir / "result.pt"
    env = {key: value for key, value in os.environ.items() if key not in ("PYTHONPATH", "PYTHONHOME")}
    env.update(
        HF_HUB_OFFLINE="1",
        TRANSFORMERS_OFFLINE="1",
        HF_HOME=str(tmp_path / "hf_home"),
        TOKENIZERS_PARALLELISM="false",
        PYTHONDONTWRITEBYTECODE="1",
    )
    args = [str(converted_fixture), str(bad), str(REPO_ROOT), str(output), json.dumps(fixture_inputs.tolist())]
    result = subprocess.run(
        [sys.executable, str(script), *args],
        cwd=workdir,
        env=env,
        stdin=subprocess.DEVNULL,
        capture_output=True,
        text=True,
        timeout=300,
    )
    assert result.returncode == 0, f"remote-code process failed:\n{result.stdout}\n{result.stderr}"
    remote = torch.load(output, weights_only=False)

    # The classes came from the checkpoint (transformers_modules), never from the package.
    for role, name in (("config", "BriLLMConfig"), ("lm", "BriLLMForCausalLM"), ("base", "BriLLMModel")):
        class_name, module = remote["classes"][role]
        assert class_name == name
        assert module.startswith("transformers_modules."), module
    assert remote["package_modules"] == []
    assert list((tmp_path / "hf_home" / "modules" / "transformers_modules").rglob("modeling_brillm.py"))
    assert remote["num_slots"] == FIXTURE_SLOTS

    lm = BriLLMForCausalLM.from_pretrained(converted_fixture)
    torch.testing.assert_close(remote["logits"], logits_of(lm, fixture_inputs), rtol=1e-6, atol=1e-6)
    prompt = fixture_inputs[:2, :5]
    expected = lm.generate(prompt, attention_mask=torch.ones_like(prompt), max_new_tokens=8, do_sample=False)
    assert remote["generated"].shape == (2, 13)
    assert torch.equal(remote["generated"], expected)

    # AutoModel gives the base model: signals, no logits unless asked for (`logits_to_keep`).
    assert "last_hidden_state" in remote["base_keys"]
    assert "logits" not in remote["base_keys"] and remote["base_logits"] is None
    base = BriLLMModel.from_pretrained(converted_fixture)
    with torch.no_grad():
        expected_signals = base(fixture_inputs).last_hidden_state
    torch.testing.assert_close(remote["last_hidden_state"], expected_signals, rtol=1e-6, atol=1e-6)

    # A checkpoint whose config does not fit its tensors fails clearly in remote code too.
    assert remote["bad_error"] is not None and remote["bad_error"].startswith("ValueError: ")
    assert "num_slots" in remote["bad_error"]


# ------------------------------------------------------------------------------------------------------------
# 3. Native registration (package imported, no remote code)


@pytest.mark.parametrize("trust_remote_code", [None, False])
def test_native_auto_classes(converted_fixture, fixture_inputs, trust_remote_code):
    kwargs = {} if trust_remote_code is None else {"trust_remote_code": trust_remote_code}
    config = AutoConfig.from_pretrained(converted_fixture, **kwargs)
    assert type(config) is modeling_brillm.BriLLMConfig
    lm = AutoModelForCausalLM.from_pretrained(converted_fixture, **kwargs)
    assert type(lm) is modeling_brillm.BriLLMForCausalLM
    base = AutoModel.from_pretrained(converted_fixture, **kwargs)
    assert type(base) is modeling_brillm.BriLLMModel

    assert sorted(base.state_dict()) == sorted(name.removeprefix("model.") for name in lm.state_dict())
    for name, tensor in base.state_dict().items():
        assert torch.equal(tensor, lm.state_dict()["model." + name]), name
    with torch.no_grad():
        out = base(fixture_inputs)
    assert "logits" not in out.keys() and out.last_hidden_state.shape == (3, 8, 8)
    assert logits_of(lm, fixture_inputs).shape == (3, 8, 64)


# ------------------------------------------------------------------------------------------------------------
# 4. Checkpoints whose config.json does not fit their tensors


LOADERS = {
    "BriLLMForCausalLM": BriLLMForCausalLM.from_pretrained,
    "BriLLMModel": BriLLMModel.from_pretrained,
    "AutoModelForCausalLM": AutoModelForCausalLM.from_pretrained,
}


@pytest.mark.parametrize("num_slots", [FIXTURE_SLOTS - 100, FIXTURE_SLOTS + 1, 1 + 64 * 64])
@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_config_num_slots_disagrees_with_tensors(checkpoint_copy, loader, num_slots):
    edit_config(checkpoint_copy, num_slots=num_slots)
    with pytest.raises(ValueError, match="num_slots") as error:
        LOADERS[loader](checkpoint_copy)
    message = str(error.value)
    assert f"num_slots={FIXTURE_SLOTS}" in message and f"num_slots={num_slots}" in message


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_mismatch_is_never_silently_reinitialised(checkpoint_copy, loader):
    # transformers 5 would re-initialise mismatched tensors here, with only a logged warning.
    edit_config(checkpoint_copy, num_slots=FIXTURE_SLOTS - 100)
    with pytest.raises(ValueError, match="num_slots"):
        LOADERS[loader](checkpoint_copy, ignore_mismatched_sizes=True)


def test_num_slots_keyword_disagrees_with_tensors(converted_fixture):
    with pytest.raises(ValueError, match="num_slots"):
        BriLLMForCausalLM.from_pretrained(converted_fixture, num_slots=FIXTURE_SLOTS - 100)


def test_config_vocab_size_disagrees_with_tensors(checkpoint_copy):
    edit_config(checkpoint_copy, vocab_size=65)
    with pytest.raises(ValueError, match="vocab_size=64"):
        BriLLMForCausalLM.from_pretrained(checkpoint_copy)


@pytest.mark.parametrize("loader", sorted(LOADERS))
def test_corrupt_row_ptr_with_right_shape(checkpoint_copy, loader):
    def corrupt(tensors):
        tensors["model.graph.row_ptr"][-1] += 5  # shape unchanged, no longer ends at num_slots - 1

    rewrite_tensors(checkpoint_copy, corrupt)
    with pytest.raises(ValueError, match="num_slots"):
        LOADERS[loader](checkpoint_copy)


def test_row_ptr_and_weights_from_another_graph(checkpoint_copy):
    # Tensors of a smaller graph under an unchanged config.json: every slot-sized tensor mismatches.
    def shrink(tensors):
        for name in ("model.weights", "model.biases", "model.graph.col_idx"):
            tensors[name] = tensors[name][:-10].clone()
        tensors["model.graph.row_ptr"][-1] -= 10

    rewrite_tensors(checkpoint_copy, shrink)
    with pytest.raises(ValueError, match=f"num_slots={FIXTURE_SLOTS - 10}"):
        BriLLMForCausalLM.from_pretrained(checkpoint_copy)


def test_missing_slot_map(checkpoint_copy):
    # Absent buffers would otherwise be left as uninitialised memory.
    rewrite_tensors(checkpoint_copy, lambda tensors: tensors.pop("model.graph.col_idx"))
    with pytest.raises(ValueError, match="slot map"):
        BriLLMForCausalLM.from_pretrained(checkpoint_copy)


# ------------------------------------------------------------------------------------------------------------
# 5. bfloat16 storage


@pytest.fixture(scope="module")
def converted_bf16(tmp_path_factory, fixture_converter):
    return fixture_converter(tmp_path_factory.mktemp("bf16") / "official-tiny-bf16", "--dtype", "bfloat16")


def test_bfloat16_conversion(converted_bf16, converted_fixture, fixture_inputs):
    assert json.loads((converted_bf16 / "config.json").read_text())["dtype"] == "bfloat16"
    fp32, bf16 = saved_tensors(converted_fixture), saved_tensors(converted_bf16)
    assert sorted(fp32) == sorted(bf16)
    for name in FLOAT_KEYS:
        assert fp32[name].dtype == torch.float32 and bf16[name].dtype == torch.bfloat16, name
        assert torch.equal(bf16[name], fp32[name].to(torch.bfloat16)), name
    for name, dtype in GRAPH_DTYPES.items():
        assert bf16[name].dtype == dtype, name
        assert torch.equal(bf16[name], fp32[name]), name

    model = BriLLMForCausalLM.from_pretrained(converted_bf16)
    state = model.state_dict()
    assert all(state[name].dtype == torch.bfloat16 for name in FLOAT_KEYS)
    assert all(state[name].dtype == dtype for name, dtype in GRAPH_DTYPES.items())
    reference = logits_of(BriLLMForCausalLM.from_pretrained(converted_fixture), fixture_inputs)
    logits = logits_of(model, fixture_inputs)
    assert logits.dtype == torch.float32
    relative = ((logits - reference).norm() / reference.norm()).item()
    assert 0 < relative < 1e-2
    torch.testing.assert_close(logits, reference, rtol=2e-2, atol=1e-2)
    prompt = fixture_inputs[:1, :4]
    assert model.generate(prompt, max_new_tokens=4, do_sample=False).shape == (1, 8)

    # Loading with an explicit float dtype casts the parameters, never the integer slot map.
    upcast = BriLLMForCausalLM.from_pretrained(converted_bf16, dtype=torch.float32)
    upcast_state = upcast.state_dict()
    assert all(upcast_state[name].dtype == torch.float32 for name in FLOAT_KEYS)
    for name, dtype in GRAPH_DTYPES.items():
        assert upcast_state[name].dtype == dtype and torch.equal(upcast_state[name], fp32[name]), name
