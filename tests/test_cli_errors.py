"""Every ``brillm`` subcommand answers a user error with one ``error:`` line on stderr and exit status 2, and the
line says what is wrong (issue 13, case 8); ``--debug`` shows the traceback instead."""

import shutil

import pytest

from modeling_brillm.cli import main
from modeling_brillm.preparation import prepare
from modeling_brillm.train import Recipe

CORPUS = "".join(f"line {i} of a small corpus, the cat sat on the mat\n" for i in range(60))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A prepared model folder with its tokenizer (read-only: copy it before editing)."""
    folder = tmp_path_factory.mktemp("cli")
    (folder / "corpus.txt").write_text(CORPUS)
    prepare([folder / "corpus.txt"], folder / "P", seq_len=12, hidden_size=4, log=None)
    return folder / "P" / "model"


@pytest.fixture
def error_of(capsys):
    """``brillm ARGS`` that must fail on bad input: its one stderr line."""

    def run(*args):
        with pytest.raises(SystemExit) as exit_info:
            main([str(arg) for arg in args])
        err = capsys.readouterr().err
        assert exit_info.value.code == 2, err
        assert err.count("\n") == 1 and err.startswith("error: ") and "Traceback" not in err, err
        return err.strip()

    return run


def test_model_folder_errors(model_dir, tmp_path, error_of, capsys):
    (tmp_path / "text.txt").write_text("the cat sat\n")
    missing = tmp_path / "nowhere"
    assert error_of("eval", missing, "--data", tmp_path / "text.txt") == f"error: {missing}: no such model folder."
    assert error_of("generate", missing, "--prompt", "the") == f"error: {missing}: no such model folder."

    bare = shutil.copytree(model_dir, tmp_path / "bare")
    for name in ("tokenizer.json", "tokenizer_config.json"):
        (bare / name).unlink()
    message = error_of("eval", bare, "--data", tmp_path / "text.txt")
    assert "has no tokenizer (no tokenizer.json or tokenizer_config.json)" in message and "sentencepiece" not in message
    main(["generate", str(bare), "--prompt-ids", "5,6", "--max-new-tokens", "2"])  # ids need no tokenizer
    assert capsys.readouterr().out.startswith("ids: 5 6 ")
    assert "give --prompt-ids instead of --prompt" in error_of("generate", bare, "--prompt", "the")

    corrupt = shutil.copytree(model_dir, tmp_path / "corrupt")
    (corrupt / "tokenizer.json").write_text('{"version": "1.0", "model": {')
    assert f"{corrupt / 'tokenizer.json'} is corrupt" in error_of("eval", corrupt, "--data", tmp_path / "text.txt")
    assert f"{corrupt / 'tokenizer.json'} is corrupt" in error_of("generate", corrupt, "--prompt", "the")


def test_generation_arguments(model_dir, error_of):
    assert "--prompt-ids: token id -2 is outside [0, " in error_of("generate", model_dir, "--prompt-ids", "5,-2")
    assert "--prompt-ids: token id 10000 is outside" in error_of("generate", model_dir, "--prompt-ids", "10000")
    assert "comma-separated integers; got '5,x'" in error_of("generate", model_dir, "--prompt-ids", "5,x")
    assert "--num-beams must be at least 1; got 0" in error_of("generate", model_dir, "--prompt-ids", "5", "--num-beams", "0")
    assert "--max-new-tokens must be at least 1" in error_of("generate", model_dir, "--prompt", "the", "--max-new-tokens", "0")
    assert "--top-p must lie in (0, 1]" in error_of("generate", model_dir, "--prompt", "the", "--do-sample", "--top-p", "0")


def test_eval_names_file_and_byte_offset_of_invalid_utf8(model_dir, tmp_path, error_of):
    (tmp_path / "bad.txt").write_bytes(b"the cat\n\xe9t\xe9\n")
    message = error_of("eval", model_dir, "--data", tmp_path / "bad.txt")
    assert f"{tmp_path / 'bad.txt'} is not valid UTF-8 at byte offset 8" in message


def test_eval_seq_len_and_missing_data(model_dir, tmp_path, error_of):
    (tmp_path / "text.txt").write_text("the cat sat on the mat\n")
    assert "--seq-len must be at least 2" in error_of("eval", model_dir, "--data", tmp_path / "text.txt", "--seq-len", "1")
    assert "No such file or directory" in error_of("eval", model_dir, "--data", tmp_path / "missing.txt")


@pytest.mark.parametrize(
    "setting, expected",
    [
        ("batch_size: 0", "train.batch_size must be at least 1; got 0"),
        ("save_steps: 0", "train.save_steps must be at least 1; got 0"),
        ("gradient_accumulation_steps: 0", "train.gradient_accumulation_steps must be at least 1"),
        ("mixed_precision: fp8", "train.mixed_precision must be one of ('no', 'bf16', 'fp16'); got 'fp8'"),
        ("learning_rte: 0.1", "unknown train keys ['learning_rte']"),
    ],
)
def test_bad_recipes(model_dir, tmp_path, error_of, setting, expected):
    recipe = tmp_path / "r.yaml"
    recipe.write_text(f"data:\n  prepared: {model_dir.parent}\ntrain:\n  {setting}\n")
    assert expected in error_of("train", "--config", recipe, "--output-dir", tmp_path / "out")
    assert not (tmp_path / "out").exists()


def test_yaml_no_is_the_word_no(tmp_path):
    recipe = tmp_path / "r.yaml"
    recipe.write_text("train:\n  mixed_precision: no\n")  # YAML 1.1 reads `no` as False
    assert Recipe.from_yaml(recipe).train.mixed_precision == "no"


def test_missing_recipe_and_debug_traceback(tmp_path, error_of, capsys):
    assert "No such file or directory" in error_of("train", "--config", tmp_path / "missing.yaml")
    with pytest.raises(FileNotFoundError):
        main(["--debug", "train", "--config", str(tmp_path / "missing.yaml")])
