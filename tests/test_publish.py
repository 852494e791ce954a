"""Publishing to the Hub: ``brillm push`` and ``hub_brillm.push_model``, against a local stand-in of the Hub API.

The stand-in (``hub_stand_in.py``) serves the endpoints ``huggingface_hub`` calls to create a repository, a
branch and a commit, and stores what was committed. The uploaded folder is then loaded in a fresh process where
the ``modeling_brillm`` package cannot be imported, with ``trust_remote_code=True``.
"""

import json
import os
import subprocess
import sys
import textwrap
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from huggingface_hub import ModelCard

from hub_stand_in import HubStandIn
from modeling_brillm import BriLLMConfig, BriLLMForCausalLM
from modeling_brillm.cli import main as brillm
from modeling_brillm.hub_brillm import push_model, write_model_card
from modeling_brillm.tokenization_brillm import character_tokenizer, save_tokenizer

REPO_ROOT = Path(__file__).resolve().parent.parent
TOKENS = ["<unk>", *"abcdefghijklmnop ,."]
CODE_AND_WEIGHTS = {
    "config.json",
    "configuration_brillm.py",
    "generation_config.json",
    "graph_brillm.py",
    "kernels_brillm.py",
    "model.safetensors",
    "modeling_brillm.py",
    "scoring_brillm.py",
    "signal_brillm.py",
}
UPLOADED = CODE_AND_WEIGHTS | {"README.md", "tokenizer.json", "tokenizer_config.json"}
TEXT = "abc fed, pop."


def snapshot(folder):
    return {p.name: p.read_bytes() for p in sorted(Path(folder).iterdir())}


@pytest.fixture
def checkpoint(tmp_path):
    """A small saved model with a character tokenizer and a card, as `brillm train` or the converter leave one."""
    torch.manual_seed(0)
    config = BriLLMConfig(vocab_size=len(TOKENS), hidden_size=4, max_position_embeddings=16, suppress_self_loop=True)
    model = BriLLMForCausalLM(config).eval()
    folder = tmp_path / "brillm-tiny"
    model.save_pretrained(folder)
    save_tokenizer(character_tokenizer({t: i for i, t in enumerate(TOKENS)}), folder)
    write_model_card(folder, model.config, made_from="Random weights, for the publishing test.")
    return folder


@pytest.fixture
def hub(tmp_path, monkeypatch):
    """The stand-in Hub, with this process's huggingface_hub pointed at it and holding its token."""
    with HubStandIn(tmp_path / "remote") as hub:
        monkeypatch.setattr(huggingface_hub.constants, "ENDPOINT", hub.endpoint)
        monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", False)
        monkeypatch.setattr(huggingface_hub.constants, "HF_TOKEN_PATH", str(tmp_path / "no-token-file"))
        monkeypatch.setenv("HF_TOKEN", hub.token)
        yield hub


LOAD_UPLOADED = textwrap.dedent(
    '''
    import importlib.abc, json, sys

    class HidePackage(importlib.abc.MetaPathFinder):
        def find_spec(self, name, path=None, target=None):
            if name.split(".")[0] == "modeling_brillm":
                raise ModuleNotFoundError(f"No module named {name!r}", name=name)

    sys.meta_path.insert(0, HidePackage())
    import torch
    from transformers import AutoModelForCausalLM, AutoTokenizer

    folder, text = sys.argv[1:3]
    model = AutoModelForCausalLM.from_pretrained(folder, trust_remote_code=True)
    tokenizer = AutoTokenizer.from_pretrained(folder, trust_remote_code=True)
    inputs = tokenizer(text, return_tensors="pt", add_special_tokens=False)
    with torch.no_grad():
        logits = model(inputs.input_ids).logits
        output = model.generate(**inputs, max_new_tokens=8, do_sample=False)
    print(json.dumps({
        "model_module": type(model).__module__,
        "ids": inputs.input_ids[0].tolist(),
        "logits": logits[0].tolist(),
        "generated": output[0].tolist(),
        "text": tokenizer.decode(output[0], skip_special_tokens=True),
    }))
    '''
)


def test_brillm_push_uploads_everything_in_one_commit(checkpoint, tmp_path):
    before = snapshot(checkpoint)
    with HubStandIn(tmp_path / "remote") as hub:
        env = {k: v for k, v in os.environ.items() if k not in ("HF_HUB_OFFLINE", "TRANSFORMERS_OFFLINE", "PYTHONPATH")}
        env.update(HF_ENDPOINT=hub.endpoint, HF_TOKEN=hub.token, HF_HOME=str(tmp_path / "hf_home"))
        command = [sys.executable, "-m", "modeling_brillm.cli", "push", str(checkpoint), "me/brillm-tiny"]
        command += ["--private", "--revision", "v1"]
        result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=REPO_ROOT, timeout=300)
    assert result.returncode == 0, result.stderr
    assert result.stdout.startswith(f"pushed {checkpoint} to me/brillm-tiny: {hub.endpoint}/me/brillm-tiny/commit/")

    assert hub.repos == {"me/brillm-tiny": {"private": True, "branches": {"main", "v1"}}}
    assert len(hub.commits) == 1
    commit = hub.commits[0]
    assert commit["revision"] == "v1" and commit["files"] == sorted(UPLOADED)
    remote = hub.folder("me/brillm-tiny", "v1")
    assert snapshot(remote) == before  # the very files of the folder ...
    assert snapshot(checkpoint) == before  # ... which push never changes

    # The uploaded folder works where the package is not installed.
    env = {k: v for k, v in os.environ.items() if k != "PYTHONPATH"}
    env.update(HF_HUB_OFFLINE="1", HF_HOME=str(tmp_path / "fresh_home"), TOKENIZERS_PARALLELISM="false")
    command = [sys.executable, "-c", LOAD_UPLOADED, str(remote), TEXT]
    result = subprocess.run(command, capture_output=True, text=True, env=env, cwd=tmp_path, timeout=300)
    assert result.returncode == 0, result.stderr
    loaded = json.loads(result.stdout.strip().splitlines()[-1])
    assert loaded["model_module"].startswith("transformers_modules.")
    assert loaded["ids"] == [TOKENS.index(c) for c in TEXT]
    model = BriLLMForCausalLM.from_pretrained(checkpoint).eval()
    ids = torch.tensor([loaded["ids"]])
    with torch.no_grad():
        torch.testing.assert_close(torch.tensor(loaded["logits"]), model(ids).logits[0], rtol=1e-6, atol=1e-6)
        expected = model.generate(ids, max_new_tokens=8, do_sample=False)[0].tolist()
    assert loaded["generated"] == expected
    assert loaded["text"] == "".join(TOKENS[i] for i in expected if i != 0)


def test_push_of_a_folder_without_card_uploads_a_generated_one(checkpoint, hub):
    (checkpoint / "README.md").unlink()
    before = snapshot(checkpoint)
    brillm(["push", str(checkpoint), "brillm-tiny"])  # no namespace: the token's user
    assert [c["repo_id"] for c in hub.commits] == [f"{hub.user}/brillm-tiny"]
    assert hub.commits[0]["files"] == sorted(UPLOADED)
    card = ModelCard.load(hub.folder(f"{hub.user}/brillm-tiny") / "README.md")
    assert card.data.tags == ["brillm", "custom_code"] and card.data.library_name == "transformers"
    assert f'from_pretrained("{hub.user}/brillm-tiny", trust_remote_code=True)' in card.text
    assert "one token per character" in card.text
    assert snapshot(checkpoint) == before and not (checkpoint / "README.md").exists()


def test_push_model(hub):
    torch.manual_seed(0)
    model = BriLLMForCausalLM(BriLLMConfig(vocab_size=12, hidden_size=4, max_position_embeddings=16))
    url = push_model(model, "me/pushed", private=True, tags=["demo"], commit_message="first upload")
    assert url.startswith(f"{hub.endpoint}/me/pushed/commit/")
    assert hub.repos["me/pushed"]["private"] is True
    assert [(c["summary"], c["files"]) for c in hub.commits] == [("first upload", sorted(CODE_AND_WEIGHTS | {"README.md"}))]
    remote = hub.folder("me/pushed")
    card = ModelCard.load(remote / "README.md")
    assert card.data.tags == ["brillm", "custom_code", "demo"]
    assert 'from_pretrained("me/pushed", trust_remote_code=True)' in card.text
    reloaded = BriLLMForCausalLM.from_pretrained(remote)
    assert all(torch.equal(reloaded.state_dict()[k], v) for k, v in model.state_dict().items())


def reject_commits(hub, monkeypatch):
    hub.reject_commits = True


FAILURES = {  # what goes wrong -> (how to make it happen, the one-line error)
    "no token": (
        lambda hub, mp: mp.delenv("HF_TOKEN"),
        "error: no Hugging Face token: log in with `hf auth login`, set HF_TOKEN or pass a token.",
    ),
    "invalid token": (
        lambda hub, mp: mp.setenv("HF_TOKEN", "hf_wrong"),
        "error: could not push {folder} to me/brillm-tiny: HfHubHTTPError: Client error '401 Unauthorized' for url "
        "'{endpoint}/api/repos/create'",
    ),
    "network down": (
        lambda hub, mp: mp.setattr(huggingface_hub.constants, "ENDPOINT", "http://127.0.0.1:9"),
        "error: could not push {folder} to me/brillm-tiny: ConnectError: [Errno 111] Connection refused",
    ),
    "offline mode": (
        lambda hub, mp: mp.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True),
        "error: could not push {folder} to me/brillm-tiny: OfflineModeIsEnabled: Cannot reach {endpoint}/api/repos/create: "
        "offline mode is enabled. To disable it, please unset the `HF_HUB_OFFLINE` environment variable.",
    ),
    "commit refused": (
        reject_commits,
        "error: could not push {folder} to me/brillm-tiny: HfHubHTTPError: 403 Forbidden: You don't have the rights "
        "to create a commit in this repo.",
    ),
    "incomplete folder": (
        None,
        "error: {folder} is incomplete: model.safetensors missing.",
    ),
}


@pytest.mark.parametrize("failure", sorted(FAILURES))
def test_failed_push_is_one_line_and_leaves_the_folder_untouched(failure, checkpoint, hub, monkeypatch, capsys):
    make_it_fail, expected = FAILURES[failure]
    if make_it_fail is None:
        (checkpoint / "model.safetensors").unlink()
    else:
        make_it_fail(hub, monkeypatch)
    before = snapshot(checkpoint)
    with pytest.raises(SystemExit) as error:
        brillm(["push", str(checkpoint), "me/brillm-tiny"])
    assert error.value.code == 2
    message = capsys.readouterr().err.removesuffix("\n")
    assert message == expected.format(folder=checkpoint, endpoint=hub.endpoint)
    assert "\n" not in message
    assert snapshot(checkpoint) == before and hub.commits == []
