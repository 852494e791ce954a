"""Release-grade checkpoints: tokenizers of the released vocabularies, export back to the reference layout,
bad reference files, sharded and memory-mapped checkpoints, model cards.

The released BriLLM0.5 vocabulary files carry no licence, so they are not in this repository: the tokenizer tests
build equivalent ones. Point ``BRILLM_REFERENCE_DIR`` at a folder holding ``vocab_wiki_4k.json``,
``vocab_wiki_4k_en.json`` and ``wiki_bpe_tokenizer_4000_bytelevel.json`` to run them on the released files too.
"""

import json
import os
import re
import shutil
import subprocess
import sys
from pathlib import Path

import pytest
import torch
from huggingface_hub import ModelCard
from safetensors.torch import load_file
from tokenizers import Tokenizer, decoders, models, normalizers, pre_tokenizers, trainers
from transformers import AutoTokenizer

from modeling_brillm import BriLLMConfig, BriLLMForCausalLM
from modeling_brillm import conversion as converter
from modeling_brillm import export as exporter
from modeling_brillm.hub_brillm import write_model_card
from modeling_brillm.tokenization_brillm import character_tokenizer, save_tokenizer, tokenizer_from_json
from modeling_brillm.output_folders import current_umask

REPO_ROOT = Path(__file__).resolve().parent.parent

RELEASED = Path(os.environ["BRILLM_REFERENCE_DIR"]) if os.environ.get("BRILLM_REFERENCE_DIR") else None
SPECIALS = ["[PAD]", "[UNK]", "[CLS]", "[SEP]", "[MASK]"]
FOLD = {code: code - 0xFEE0 for code in range(0xFF01, 0xFF5F)} | {0x3000: 0x20}  # full width -> half width

ENGLISH_TEXT = (
    "In frogs, the hind legs are larger than the fore legs, and they are used for jumping and swimming. "
    "The city was founded in 1820 on the banks of a wide river; by 1900 it had grown to more than 40,000 people. "
    "Its first railway station opened in 1861, and the old market hall (now a museum) is still standing. "
    "Some of the houses were built of stone, others of wood, and a few were painted red or blue!"
)
CHINESE_TEXT = (  # full-width ，；（）！？： as Chinese text has them, plus the CJK 。、“” the vocabulary holds
    "罗马是意大利的首都，也是欧洲历史最悠久的城市之一。相传罗马城建于公元前753年，由罗慕路斯所建立。"
    "在古代，罗马先后经历了王政时期、共和时期和帝国时期；其疆域一度从大西洋延伸到幼发拉底河。"
    "今天的罗马有约280万居民，市中心保存着大量古迹（例如斗兽场、万神殿和古罗马广场）！"
    "你去过罗马吗？许多游客说：“一生至少要去一次。”　罗马也是天主教会的中心，梵蒂冈城国位于城中。"
    "城里的台伯河自北向南流过，河上有二十多座桥；最古老的一座建于公元前62年。"
    "每年夏天（六月至八月），气温常常超过30度，许多居民会离开城市去海边度假！"
)


def released_file(name):
    if RELEASED is None:
        pytest.skip("set BRILLM_REFERENCE_DIR to the released BriLLM0.5 files to run this case")
    return RELEASED / name


def tensors(folder):
    out = {}
    for path in sorted(Path(folder).glob("*.safetensors")):
        out.update(load_file(path))
    return out


def snapshot(folder):
    """Name -> bytes of every file under ``folder`` (to show it did not change)."""
    return {str(p.relative_to(folder)): p.read_bytes() for p in sorted(Path(folder).rglob("*")) if p.is_file()}


def chinese_vocabulary():
    """A vocabulary like ``vocab_wiki_4k.json``: ``<unk>`` = 0, half-width punctuation only, no Latin letters."""
    characters = dict.fromkeys(",;()!?:. 0123456789。、“”" + CHINESE_TEXT.translate(FOLD))
    return {"<unk>": 0, **{c: i + 1 for i, c in enumerate(characters)}}


@pytest.fixture(scope="module")
def bpe_json(tmp_path_factory):
    """A byte-level BPE built like ``wiki_bpe_tokenizer_4000_bytelevel.json`` (NFKC, prefix space, 5 specials)."""
    bpe = Tokenizer(models.BPE(unk_token="[UNK]"))
    bpe.normalizer = normalizers.NFKC()
    bpe.pre_tokenizer = pre_tokenizers.ByteLevel(add_prefix_space=True)
    bpe.decoder = decoders.ByteLevel()
    alphabet = pre_tokenizers.ByteLevel.alphabet()
    trainer = trainers.BpeTrainer(vocab_size=400, special_tokens=SPECIALS, initial_alphabet=alphabet)
    bpe.train_from_iterator([ENGLISH_TEXT] * 3, trainer)
    path = tmp_path_factory.mktemp("bpe") / "bpe.json"
    bpe.save(str(path))
    return path


# ------------------------------------------------------------------------------------------------------------
# 1. Tokenizers of the released vocabularies


@pytest.mark.parametrize("source", ["built", "released"])
def test_chinese_tokenizer_folds_full_width_punctuation(source, tmp_path):
    if source == "released":
        vocab = json.loads(released_file("vocab_wiki_4k.json").read_text(encoding="utf-8"))
    else:
        vocab = chinese_vocabulary()
    assert vocab["<unk>"] == 0
    assert not any("\uff01" <= token <= "\uff5e" for token in vocab), "the vocabulary holds half-width forms only"
    folded = CHINESE_TEXT.translate(FOLD)
    assert folded != CHINESE_TEXT and len(folded) == len(CHINESE_TEXT) > 200

    save_tokenizer(character_tokenizer(vocab), tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, trust_remote_code=False)
    ids = tokenizer(CHINESE_TEXT, add_special_tokens=False).input_ids
    assert ids == [vocab.get(c, 0) for c in folded]  # one id per character, full width folded, unknown -> <unk>
    for wide, narrow in zip("，；（）！？：", ",;()!?:"):
        assert wide in CHINESE_TEXT and ids[CHINESE_TEXT.index(wide)] == vocab[narrow]
    assert ids == tokenizer(folded, add_special_tokens=False).input_ids
    assert tokenizer.decode(ids) == "".join(c if c in vocab else "<unk>" for c in folded)  # no spaces inserted
    if source == "built":
        assert 0 not in ids and tokenizer.decode(ids) == folded  # a lossless round trip up to the folding
    assert tokenizer("罗Ａ马", add_special_tokens=False).input_ids == [vocab["罗"], 0, vocab["马"]]  # no crash


@pytest.mark.parametrize("source", ["built", "released"])
def test_english_bpe_tokenizer_keeps_specials_and_decodes_cleanly(source, bpe_json, tmp_path):
    path = released_file("wiki_bpe_tokenizer_4000_bytelevel.json") if source == "released" else bpe_json
    if source == "released":
        vocab = json.loads(released_file("vocab_wiki_4k_en.json").read_text(encoding="utf-8"))
    else:
        vocab = dict(sorted(Tokenizer.from_file(str(path)).get_vocab().items(), key=lambda item: item[1]))
    assert list(vocab)[:5] == SPECIALS

    save_tokenizer(tokenizer_from_json(path, vocab), tmp_path)
    assert json.loads((tmp_path / "tokenizer_config.json").read_text())["tokenizer_class"] == "PreTrainedTokenizerFast"
    tokenizer = AutoTokenizer.from_pretrained(tmp_path, trust_remote_code=False)
    assert tokenizer.convert_ids_to_tokens([0, 1, 2, 3, 4]) == SPECIALS
    assert (tokenizer.pad_token_id, tokenizer.unk_token_id, tokenizer.cls_token_id, tokenizer.sep_token_id) == (0, 1, 2, 3)
    assert tokenizer.mask_token_id == 4 and len(tokenizer) == len(vocab)

    ids = tokenizer(ENGLISH_TEXT, add_special_tokens=False).input_ids
    assert ids == Tokenizer.from_file(str(path)).encode(ENGLISH_TEXT).ids  # what the reference code feeds its model
    assert len(ids) < len(ENGLISH_TEXT) / 2 and 1 not in ids
    text = tokenizer.decode(ids)
    assert "Ġ" not in text and text == " " + ENGLISH_TEXT  # the prefix space, as the reference prints it
    batch = tokenizer(["the hind legs", ENGLISH_TEXT[:60]], padding=True, add_special_tokens=False)
    assert batch.input_ids[0][0] == 0  # left padding with [PAD]
    assert tokenizer.batch_decode(batch.input_ids, skip_special_tokens=True)[0] == " the hind legs"


def test_converter_writes_a_portable_tokenizer_config(tmp_path, reference_files):
    tokens = list(chinese_vocabulary())
    checkpoint, vocab, frequencies = reference_files(tmp_path / "ref", tokens, owned_fraction=0.05)
    converter.convert(checkpoint, vocab, frequencies, tmp_path / "out")
    config = json.loads((tmp_path / "out" / "tokenizer_config.json").read_text())
    assert config["tokenizer_class"] == "PreTrainedTokenizerFast" and config["unk_token"] == "<unk>"
    tokenizer = AutoTokenizer.from_pretrained(tmp_path / "out", trust_remote_code=False)
    assert tokenizer("马，", add_special_tokens=False).input_ids == [tokens.index("马"), tokens.index(",")]


# ------------------------------------------------------------------------------------------------------------
# 2. Export back to the reference layout


def run_script(script, *args):
    command = [sys.executable, str(script), *map(str, args)]
    return subprocess.run(command, capture_output=True, text=True, cwd=REPO_ROOT, timeout=300)


def test_conversion_commands_run_as_package_modules(fixture_dir, tmp_path):
    # `python -m modeling_brillm.conversion` / `.export` are the scripts' commands, run from any folder: the code
    # lives in the package, so nothing depends on the scripts' own folder being on sys.path.
    files = ["--checkpoint", fixture_dir / "model.bin", "--vocab", fixture_dir / "vocab.json"]
    files += ["--frequencies", fixture_dir / "word_frequency.json"]
    for command in (
        ["-m", "modeling_brillm.conversion", *files, "--output", tmp_path / "hf"],
        ["-m", "modeling_brillm.export", tmp_path / "hf", "--output", tmp_path / "model.bin"],
    ):
        result = subprocess.run([sys.executable, *map(str, command)], capture_output=True, text=True, cwd=tmp_path,
                                timeout=300)  # fmt: skip
        assert result.returncode == 0, result.stderr
        assert result.stdout.startswith("wrote "), result.stdout
    original = torch.load(fixture_dir / "model.bin", weights_only=True)
    exported = torch.load(tmp_path / "model.bin", weights_only=True)
    assert list(exported) == list(original) and all(torch.equal(exported[k], original[k]) for k in original)


def test_export_of_a_conversion_is_the_reference_checkpoint(converted_fixture, fixture_dir, tmp_path):
    exporter_script = REPO_ROOT / "conversion" / "export_official_checkpoint.py"
    result = run_script(exporter_script, converted_fixture, "--output", tmp_path / "model.bin")
    assert result.returncode == 0, result.stderr
    original = torch.load(fixture_dir / "model.bin", weights_only=True)
    exported = torch.load(tmp_path / "model.bin", weights_only=True)
    assert list(exported) == list(original) == ["positions", "weights", "biases", "node_bias"]
    for key, tensor in original.items():
        assert exported[key].dtype == torch.float32 and torch.equal(exported[key], tensor), key
        assert not isinstance(exported[key], torch.nn.Parameter)

    # ... and converting the export again gives back the same folder, tensor for tensor.
    frequencies = fixture_dir / "word_frequency.json"
    converter.convert(tmp_path / "model.bin", fixture_dir / "vocab.json", frequencies, tmp_path / "again")
    first, second = tensors(converted_fixture), tensors(tmp_path / "again")
    assert sorted(first) == sorted(second)
    assert all(first[k].dtype == second[k].dtype and torch.equal(first[k], second[k]) for k in first)


def test_export_with_vocabulary_and_frequencies_round_trips(tmp_path, reference_files):
    tokens = list(chinese_vocabulary())
    checkpoint, vocab, frequencies = reference_files(tmp_path / "ref", tokens, owned_fraction=0.2)
    converter.convert(checkpoint, vocab, frequencies, tmp_path / "hf")
    exporter.export(tmp_path / "hf", tmp_path / "model.bin", tmp_path / "vocab.json", tmp_path / "freq.json")

    assert json.loads((tmp_path / "vocab.json").read_text()) == json.loads(vocab.read_text())
    original, written = json.loads(frequencies.read_text()), json.loads((tmp_path / "freq.json").read_text())
    assert list(written) == tokens
    for source in tokens:  # the same edges share slot 0
        assert {t for t, c in written[source].items() if c == 0} == {t for t, c in original[source].items() if c == 0}
        assert len(written[source]) == len(tokens)
    converter.convert(tmp_path / "model.bin", tmp_path / "vocab.json", tmp_path / "freq.json", tmp_path / "hf2")
    first, second = tensors(tmp_path / "hf"), tensors(tmp_path / "hf2")
    assert all(torch.equal(first[k], second[k]) for k in first) and sorted(first) == sorted(second)
    reference = torch.load(checkpoint, weights_only=True)
    assert all(torch.equal(reference[k], torch.load(tmp_path / "model.bin", weights_only=True)[k]) for k in reference)


def test_export_of_bfloat16_and_sharded_folders(fixture_dir, tmp_path):
    files = (fixture_dir / "model.bin", fixture_dir / "vocab.json", fixture_dir / "word_frequency.json")
    converter.convert(*files, tmp_path / "sharded", max_shard_size="100KB")
    converter.convert(*files, tmp_path / "bf16", dtype="bfloat16")
    shards = sorted(p.name for p in (tmp_path / "sharded").glob("*.safetensors"))
    assert shards == ["model-00001-of-00002.safetensors", "model-00002-of-00002.safetensors"]
    index = json.loads((tmp_path / "sharded" / "model.safetensors.index.json").read_text())
    assert set(index["weight_map"].values()) == set(shards)
    assert index["weight_map"]["model.weights"] != index["weight_map"]["model.biases"]  # the weights fill one shard

    reference = torch.load(fixture_dir / "model.bin", weights_only=True)
    state = exporter.export(tmp_path / "sharded", tmp_path / "sharded.bin")
    assert all(torch.equal(state[k], reference[k]) for k in reference)
    state = exporter.export(tmp_path / "bf16", tmp_path / "bf16.bin")
    for key, tensor in reference.items():  # bfloat16 is widened exactly
        assert state[key].dtype == torch.float32 and torch.equal(state[key], tensor.to(torch.bfloat16).float()), key


# ------------------------------------------------------------------------------------------------------------
# 3. Bad input: one clear error naming the file and the mismatch; nothing written


@pytest.fixture
def reference_copy(fixture_dir, tmp_path):
    folder = tmp_path / "reference"
    folder.mkdir()
    for name in ("model.bin", "vocab.json", "word_frequency.json"):
        shutil.copy(fixture_dir / name, folder / name)
    return folder


def corrupt_checkpoint(folder, how):
    path = folder / "model.bin"
    data = path.read_bytes()
    if how == "truncated":
        path.write_bytes(data[: len(data) // 2])
    elif how == "not a checkpoint":
        path.write_bytes(b"<html>404 Not Found</html>")
    elif how == "damaged tensor data":
        state = torch.load(path, weights_only=True)
        state["weights"][7, 1, 2] = float("nan")
        torch.save(state, path)
    return {
        "truncated": r"model\.bin: cannot read this checkpoint \(RuntimeError: .*central directory\); the file is truncated",
        "not a checkpoint": r"model\.bin: cannot read this checkpoint \(UnpicklingError: .*\); the file is truncated",
        "damaged tensor data": r"model\.bin: weights holds 1 NaN or infinite values; the file is corrupted",
    }[how]


def edit_json(path, edit):
    data = json.loads(path.read_text(encoding="utf-8"))
    path.write_text(json.dumps(edit(data), ensure_ascii=False), encoding="utf-8")


def extra_token(vocab):
    return {**vocab, "Ġextra": len(vocab)}


def other_vocabulary(frequencies):
    rename = lambda token: "Ġ" + token if token.startswith("[") else token  # noqa: E731
    return {rename(s): {rename(t): c for t, c in row.items()} for s, row in frequencies.items()}


BAD_INPUTS = {
    "truncated checkpoint": lambda f: corrupt_checkpoint(f, "truncated"),
    "file that is not a checkpoint": lambda f: corrupt_checkpoint(f, "not a checkpoint"),
    "NaN in the tensors": lambda f: corrupt_checkpoint(f, "damaged tensor data"),
    "vocabulary larger than node_bias": lambda f: (
        edit_json(f / "vocab.json", extra_token),
        r"model\.bin: node_bias has 64 rows \(one per node\) but the vocabulary .*vocab\.json has 65 tokens",
    )[1],
    "frequencies of another vocabulary": lambda f: (
        edit_json(f / "word_frequency.json", other_vocabulary),
        r"word_frequency\.json: target token 'Ġ\[\w+\]' is not in the vocabulary .*vocab\.json; the frequency file "
        "belongs to another vocabulary",
    )[1],
    "truncated frequency file": lambda f: (
        (f / "word_frequency.json").write_bytes((f / "word_frequency.json").read_bytes()[:5000]),
        r"word_frequency\.json: not valid UTF-8 JSON \(.*\); is the file truncated\?",
    )[1],
}


@pytest.mark.parametrize("case", sorted(BAD_INPUTS))
def test_bad_reference_files_are_refused_before_writing(case, reference_copy, converted_fixture, tmp_path):
    pattern = BAD_INPUTS[case](reference_copy)
    files = [reference_copy / name for name in ("model.bin", "vocab.json", "word_frequency.json")]
    output = tmp_path / "out"
    with pytest.raises(converter.ConversionError, match=pattern):
        converter.convert(*files, output)
    assert not output.exists()

    # An earlier conversion in the output folder survives a failed one, byte for byte.
    shutil.copytree(converted_fixture, output)
    before = snapshot(output)
    with pytest.raises(converter.ConversionError):
        converter.convert(*files, output)
    assert snapshot(output) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out", "reference"]  # no partial folder left behind


def test_converter_cli_error_is_one_line(reference_copy, reference_converter, tmp_path):
    corrupt_checkpoint(reference_copy, "truncated")
    result = reference_converter(tmp_path / "out", checkpoint=reference_copy / "model.bin")
    assert result.returncode == 2
    assert result.stderr.count("\n") == 1 and result.stderr.startswith("error: ") and "model.bin" in result.stderr
    assert not (tmp_path / "out").exists()


def test_converter_replaces_only_a_checkpoint_folder(fixture_dir, converted_fixture, tmp_path):
    files = (fixture_dir / "model.bin", fixture_dir / "vocab.json", fixture_dir / "word_frequency.json")
    (tmp_path / "notes").mkdir()
    (tmp_path / "notes" / "todo.txt").write_text("keep me")
    with pytest.raises(converter.ConversionError, match="non-empty folder without a BriLLM checkpoint"):
        converter.convert(*files, tmp_path / "notes")
    assert (tmp_path / "notes" / "todo.txt").read_text() == "keep me"

    previous = shutil.copytree(converted_fixture, tmp_path / "previous")
    (previous / "notes.txt").write_text("the user's")
    with pytest.raises(converter.ConversionError, match="notes.txt, which a conversion does not write"):
        converter.convert(*files, previous)  # anything but an earlier conversion is never replaced
    assert (previous / "notes.txt").read_text() == "the user's"
    (previous / "notes.txt").unlink()
    (previous / "model.safetensors").write_bytes(b"an older conversion")
    converter.convert(*files, previous)  # an earlier conversion is replaced as a whole
    assert (previous / "model.safetensors").stat().st_size > 100 and (previous / "config.json").is_file()
    assert oct(previous.stat().st_mode & 0o777) == oct(0o777 & ~current_umask())


def test_a_conversion_failing_while_writing_leaves_the_output_alone(fixture_dir, converted_fixture, tmp_path, monkeypatch):
    def disk_full(*args, **kwargs):
        raise OSError(28, "No space left on device")

    monkeypatch.setattr(converter, "write_model_card", disk_full)  # the last file written
    output = Path(shutil.copytree(converted_fixture, tmp_path / "out"))
    before = snapshot(output)
    with pytest.raises(OSError, match="No space left"):
        converter.convert(fixture_dir / "model.bin", fixture_dir / "vocab.json", fixture_dir / "word_frequency.json", output)
    assert snapshot(output) == before
    assert sorted(p.name for p in tmp_path.iterdir()) == ["out"]  # the half-written folder is gone


@pytest.mark.parametrize("damage", ["truncated", "header"])
def test_export_refuses_damaged_safetensors(damage, converted_fixture, tmp_path):
    folder = Path(shutil.copytree(converted_fixture, tmp_path / "copy"))
    weights = folder / "model.safetensors"
    data = weights.read_bytes()
    weights.write_bytes(data[:-100] if damage == "truncated" else data[:8] + b"{not json" + data[17:])
    expected = "truncated or corrupted: its header lists" if damage == "truncated" else "corrupted safetensors header"
    with pytest.raises(converter.ConversionError, match=re.escape(f"{weights}: {expected}")):
        exporter.export(folder, tmp_path / "model.bin")
    assert sorted(p.name for p in tmp_path.iterdir()) == ["copy"]  # no model.bin, no partial file


# ------------------------------------------------------------------------------------------------------------
# 4. Size: no copy of the weights when converting or loading


def mapped_files(tensor):
    """Files whose memory mapping holds ``tensor``'s storage (empty when it lives in ordinary memory)."""
    address = tensor.untyped_storage().data_ptr()
    files = set()
    for line in Path("/proc/self/maps").read_text().splitlines():
        fields = line.split(maxsplit=5)
        start, end = (int(x, 16) for x in fields[0].split("-"))
        if start <= address < end and len(fields) == 6:
            files.add(Path(fields[5]).name)
    return files


@pytest.mark.skipif(not Path("/proc/self/maps").exists(), reason="needs Linux /proc")
def test_conversion_and_loading_map_the_weights_without_copying(fixture_dir, tmp_path):
    files = (fixture_dir / "model.bin", fixture_dir / "vocab.json", fixture_dir / "word_frequency.json")
    model = converter.convert(*files, tmp_path / "out", max_shard_size="100KB")
    assert mapped_files(model.model.weights) == {"model.bin"}  # the converter's parameter is the mapped file
    loaded = BriLLMForCausalLM.from_pretrained(tmp_path / "out")
    assert mapped_files(loaded.model.weights) == {"model-00001-of-00002.safetensors"}
    assert mapped_files(loaded.model.biases) == {"model-00002-of-00002.safetensors"}
    assert torch.equal(loaded.model.weights, model.model.weights)


# ------------------------------------------------------------------------------------------------------------
# 5. Model cards


def test_converted_model_card(tmp_path, bpe_json, reference_files):
    tokens = [t for t, _ in sorted(Tokenizer.from_file(str(bpe_json)).get_vocab().items(), key=lambda kv: kv[1])]
    checkpoint, vocab, frequencies = reference_files(tmp_path / "ref", tokens, owned_fraction=0.05)
    converter.convert(checkpoint, vocab, frequencies, tmp_path / "out", tokenizer_json=bpe_json, license="apache-2.0")
    card = ModelCard.load(tmp_path / "out" / "README.md")
    model = BriLLMForCausalLM.from_pretrained(tmp_path / "out")
    assert card.data.library_name == "transformers" and card.data.pipeline_tag == "text-generation"
    assert card.data.tags == ["brillm", "custom_code"]
    assert card.data.language == "en" and card.data.license == "apache-2.0"
    assert f"| parameters | {model.num_parameters():,} |" in card.text
    assert f"| edge slots | {model.config.num_slots:,} (1 shared + {model.config.num_slots - 1:,} owned" in card.text
    assert f"| vocabulary | {len(tokens):,} nodes |" in card.text and "byte-level BPE" in card.text
    assert "checkpoint `model.bin`, vocabulary `vocab.json`, edge frequencies `word_frequency.json`" in card.text
    assert "tokenizer `bpe.json`" in card.text and "No evaluation numbers" in card.text

    # The usage snippet runs as written.
    snippet = re.search(r"```python\n(.*?)```", card.text, re.S).group(1)
    snippet = snippet.replace("path/to/this/folder", str(tmp_path / "out"))
    namespace = {}
    exec(compile(snippet, "README.md", "exec"), namespace)
    assert namespace["output"].shape == (1, namespace["inputs"]["input_ids"].shape[1] + 32)


def test_default_card_and_an_existing_one_kept(tmp_path):
    model = BriLLMForCausalLM(BriLLMConfig(vocab_size=8, hidden_size=4, max_position_embeddings=16))
    model.save_pretrained(tmp_path)
    assert not (tmp_path / "README.md").exists()  # the model code writes no card: the tools that publish do
    write_model_card(tmp_path, model.config, overwrite=False)
    card = ModelCard.load(tmp_path / "README.md")
    assert card.data.tags == ["brillm", "custom_code"] and card.data.license == "unknown"
    assert f"| parameters | {model.num_parameters():,} |" in card.text and "tokenizer | none" in card.text
    (tmp_path / "README.md").write_text("my own card")
    write_model_card(tmp_path, model.config, overwrite=False)
    assert (tmp_path / "README.md").read_text() == "my own card"
