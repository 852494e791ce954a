"""Nothing of the user's is lost (issue 13, cases 1-7): outputs are built beside their target and swapped in only
after the work succeeded, long lines stream in bounded memory, a training folder is locked and resumed only with
its own recipe, a full disk gives one line and leaves no temporaries, and broken weights never load silently."""

import hashlib
import json
import os
import shutil
import signal
import subprocess
import sys
import textwrap
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file, save_file

from modeling_brillm import BriLLMForCausalLM
from modeling_brillm import conversion as converter
from modeling_brillm import export as exporter
from modeling_brillm.cli import main
from modeling_brillm.data import MAX_ROW_CHARS, load_text, tokenize_and_pack
from modeling_brillm.output_folders import FolderLock
from modeling_brillm.preparation import prepare
from modeling_brillm.tokenization_brillm import train_bpe_tokenizer
from modeling_brillm.train import latest_checkpoint

REPO = Path(__file__).resolve().parent.parent

CORPUS = "".join(f"line {i} of a small corpus, the cat sat on the mat\n" for i in range(60))


def snapshot(folder):
    """Relative path -> sha256 of every file below ``folder``."""
    folder = Path(folder)
    return {
        path.relative_to(folder).as_posix(): hashlib.sha256(path.read_bytes()).hexdigest()
        for path in sorted(folder.rglob("*"))
        if path.is_file()
    }


@pytest.fixture
def brillm(capsys):
    """``brillm ARGS`` in process: ``(exit status, stdout, stderr)``."""

    def run(*args):
        try:
            main([str(arg) for arg in args])
            status = 0
        except SystemExit as exit_info:
            status = exit_info.code
        out, err = capsys.readouterr()
        return status, out, err

    return run


def one_error_line(result):
    """The ``error:`` line of a failed command: exit status 2, no traceback, the last line of stderr (progress bars
    of the work done before the error may come before it)."""
    status, _, err = result
    lines = err.strip().splitlines()
    assert status == 2 and lines and lines[-1].startswith("error: ") and "Traceback" not in err, err
    assert sum(line.startswith("error:") for line in lines) == 1, err
    return lines[-1]


@pytest.fixture(scope="module")
def prepared(tmp_path_factory):
    folder = tmp_path_factory.mktemp("prepared")
    (folder / "corpus.txt").write_text(CORPUS)
    prepare([folder / "corpus.txt"], folder / "P", seq_len=12, hidden_size=4, log=None)
    return folder / "P"


# ----------------------------------------------------------------------------------------------------------------
# 1. brillm prepare checks everything first and replaces only its own earlier output


def test_prepare_errors_leave_an_earlier_output_as_it_was(prepared, tmp_path, brillm):
    output = shutil.copytree(prepared, tmp_path / "P")
    before = snapshot(output)
    (tmp_path / "small.txt").write_text(CORPUS)
    (tmp_path / "bad.txt").write_bytes(b"good text\n\xff\xfe broken\n")

    message = one_error_line(brillm("prepare", "--corpus", tmp_path / "small.txt", "--output", output, "--seq-len", "1"))
    assert "seq_len must be an integer of at least 2" in message
    message = one_error_line(brillm("prepare", "--corpus", tmp_path / "bad.txt", "--output", output))
    assert "bad.txt is not valid UTF-8 at byte offset 10" in message
    assert snapshot(output) == before
    assert BriLLMForCausalLM.from_pretrained(output / "model").config.vocab_size > 2
    assert sorted(path.name for path in tmp_path.iterdir()) == ["P", "bad.txt", "small.txt"]  # no staging left


def test_prepare_never_deletes_a_file_it_did_not_write(prepared, tmp_path, brillm):
    (tmp_path / "small.txt").write_text(CORPUS)
    output = shutil.copytree(prepared, tmp_path / "P")
    (output / "model" / "notes.txt").write_text("the user's")
    before = snapshot(output)
    message = one_error_line(brillm("prepare", "--corpus", tmp_path / "small.txt", "--output", output))
    assert f"{output / 'model' / 'notes.txt'} was not written by brillm prepare" in message
    assert snapshot(output) == before

    foreign = tmp_path / "mine"
    foreign.mkdir()
    (foreign / "thesis.tex").write_text("the user's")
    assert "brillm prepare did not write" in one_error_line(
        brillm("prepare", "--corpus", tmp_path / "small.txt", "--output", foreign)
    )
    assert (foreign / "thesis.tex").read_text() == "the user's"

    (output / "model" / "notes.txt").unlink()  # an output of its own is replaced whole
    status, _, err = brillm("prepare", "--corpus", tmp_path / "small.txt", "--output", output, "--seq-len", "8")
    assert status == 0, err
    assert json.loads((output / "prepare.json").read_text())["settings"]["seq_len"] == 8


# ----------------------------------------------------------------------------------------------------------------
# 2. Memory grows with a chunk, not with the length of a line


def test_a_long_line_in_pieces_gives_the_tokens_of_the_whole_line(tmp_path):
    words = ["the", "cat", "sat", "on", "mat", "dog", "runs", "far", "away", "and", "back"]
    line = " ".join(words[(i * 7) % len(words)] + ("," if i % 13 == 0 else "") for i in range(3000)) + "\n"
    assert len(line) > 3 * MAX_ROW_CHARS
    tokenizer = train_bpe_tokenizer([line], vocab_size=280)
    folder = tmp_path / "text"
    folder.mkdir()
    (folder / "train.txt").write_text(line)
    (folder / "valid.txt").write_text("the cat\n")
    text = load_text(folder)
    assert len(text["train"]) > 3  # the line spans several rows
    samples = tokenize_and_pack(text, tokenizer, seq_len=16)["train"]
    assert len(samples) > 1
    ids = []  # the run back from its blocks, which overlap by one token
    for index, sample in enumerate(samples):
        real = [i for i, keep in zip(sample["input_ids"], sample["attention_mask"]) if keep]
        ids.extend(real if index == 0 else real[1:])
    whole = tokenizer.backend_tokenizer.encode(line, add_special_tokens=False)
    assert ids == whole.ids
    assert sum(samples["num_chars"]) == len(line) - whole.offsets[0][1]


PEAK_RSS = textwrap.dedent(
    """
    import resource, sys
    from modeling_brillm.data import load_text, tokenize_and_pack
    from modeling_brillm.tokenization_brillm import train_character_tokenizer
    tokenizer = train_character_tokenizer(["the cat sat on a mat\\n"])
    for folder in sys.argv[2:]:  # the peak so far after each (it never decreases): short lines first
        samples = tokenize_and_pack(load_text(folder, cache_dir=sys.argv[1]), tokenizer, seq_len=32)
        print(len(samples["train"]), resource.getrusage(resource.RUSAGE_SELF).ru_maxrss * 1024)
    """
)


def test_peak_memory_of_a_single_line_is_that_of_short_lines(tmp_path):
    """1 MB of text as 80-character lines, then as one line: the peak memory grows by less than 100 MB (before
    streaming, the single line took 465 bytes a character: 465 MB more)."""
    text = ("the cat sat on a mat " * 50_000)[:1_000_000]
    folders = []
    for name, content in {"lines": "\n".join(textwrap.wrap(text, 80)) + "\n", "one-line": text + "\n"}.items():
        folders.append(tmp_path / name)
        folders[-1].mkdir()
        (folders[-1] / "train.txt").write_text(content)
        (folders[-1] / "valid.txt").write_text("the cat\n")
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "HF_DATASETS_OFFLINE": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-c", PEAK_RSS, str(tmp_path / "cache"), *map(str, folders)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 0, result.stderr[-2000:]
    (_, lines_peak), (samples, line_peak) = ([int(v) for v in row.split()] for row in result.stdout.splitlines())
    assert samples >= len(text) // 31  # the whole line was packed
    assert line_peak < lines_peak + 100e6, (lines_peak, line_peak)


# ----------------------------------------------------------------------------------------------------------------
# 3, 4, 6. Training output folders


def write_recipe(path, prepared, output_dir, **train):
    settings = {"learning_rate": 0.05, "batch_size": 4, "max_steps": 4, "save_steps": 2, "eval_steps": 4,
                "log_steps": 2, "max_eval_batches": 1, "seed": 3, **train}  # fmt: skip
    path.write_text(json.dumps({"name": "t", "output_dir": str(output_dir), "data": {"prepared": str(prepared)}, "train": settings}))
    return path


def test_resume_refuses_a_changed_recipe_and_accepts_a_longer_run(prepared, tmp_path, brillm):
    out = tmp_path / "out"
    status, _, err = brillm("train", "--config", write_recipe(tmp_path / "a.json", prepared, out))
    assert status == 0, err
    before = snapshot(out)
    changed = {"learning_rate": 0.5, "batch_size": 2, "seed": 4}
    for key, value in changed.items():
        recipe = write_recipe(tmp_path / f"{key}.json", prepared, out, **{key: value})
        message = one_error_line(brillm("train", "--config", recipe, "--resume"))
        assert f"train.{key} was " in message and f"is now {value!r}" in message and "checkpoint-4" in message
    assert snapshot(out) == before
    longer = write_recipe(tmp_path / "longer.json", prepared, out, max_steps=6, save_steps=3, log_steps=1)
    status, out_text, err = brillm("train", "--config", longer, "--resume")
    assert status == 0, err
    assert f"resumed from {out / 'checkpoint-4'} at step 4" in out_text and latest_checkpoint(out).name == "checkpoint-6"
    assert json.loads((out / "checkpoint-6" / "recipe.json").read_text())["train"]["max_steps"] == 6


def test_a_running_folder_is_refused_at_once_naming_its_holder(prepared, tmp_path, brillm):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.json", prepared, out)
    with FolderLock(out):  # another run holds the folder
        message = one_error_line(brillm("train", "--config", recipe))
    assert f"{out} is in use by another run (pid {os.getpid()}, host " in message
    assert not list(out.glob("checkpoint-*"))
    # The lock of a process that died is gone with it: a killed holder never blocks the next run.
    holder = subprocess.Popen([sys.executable, "-c", "import sys, time; sys.path.insert(0, sys.argv[1]);"
                               "from modeling_brillm.output_folders import FolderLock; lock = FolderLock(sys.argv[2]).acquire();"
                               "print('held', flush=True); time.sleep(600)", str(REPO), str(out)],
                              stdout=subprocess.PIPE, text=True)  # fmt: skip
    assert holder.stdout.readline() == "held\n"
    assert "is in use by another run" in one_error_line(brillm("train", "--config", recipe))
    holder.send_signal(signal.SIGKILL)
    holder.wait()
    assert json.loads((out / ".brillm.lock").read_text())["pid"] == holder.pid  # its stale record is still there
    status, _, err = brillm("train", "--config", recipe)
    assert status == 0, err


def test_a_fresh_run_over_an_earlier_one_needs_overwrite(prepared, tmp_path, brillm):
    out = tmp_path / "out"
    status, _, err = brillm("train", "--config", write_recipe(tmp_path / "a.json", prepared, out, max_steps=6))
    assert status == 0, err
    before = snapshot(out)
    short = write_recipe(tmp_path / "b.json", prepared, out, max_steps=2)
    message = one_error_line(brillm("train", "--config", short))
    assert "holds an earlier run (3 checkpoints, a final model)" in message and "--overwrite-output-dir" in message
    assert snapshot(out) == before
    status, _, err = brillm("train", "--config", short, "--overwrite-output-dir")
    assert status == 0, err
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-2"]  # the old run cannot be resumed
    status, out_text, err = brillm("train", "--config", short, "--resume")
    assert status == 0 and "resumed from" in out_text and "checkpoint-2 at step 2" in out_text, err


def test_checkpoints_rotate_and_stale_temporaries_are_cleaned(prepared, tmp_path, brillm):
    out = tmp_path / "out"
    out.mkdir()
    for stale in (".tmp-checkpoint-8-123", ".tmp-state-8", ".tmp-final-77"):  # what killed runs leave
        (out / stale).mkdir()
        (out / stale / "optimizer.bin").write_bytes(b"\0" * 1000)
    (out / "my-notes.txt").write_text("the user's")
    recipe = write_recipe(tmp_path / "r.json", prepared, out, max_steps=8, save_steps=2, save_total_limit=2)
    status, _, err = brillm("train", "--config", recipe)
    assert status == 0, err
    assert sorted(path.name for path in out.glob("checkpoint-*")) == ["checkpoint-6", "checkpoint-8"]
    assert not list(out.glob(".tmp-*")) and (out / "my-notes.txt").read_text() == "the user's"


SAVE_LIMITED = textwrap.dedent(
    """
    import resource, signal, sys
    signal.signal(signal.SIGXFSZ, signal.SIG_IGN)  # a write past the limit fails with EFBIG, as a full disk does
    resource.setrlimit(resource.RLIMIT_FSIZE, (int(sys.argv[1]), int(sys.argv[1])))
    from modeling_brillm.cli import main
    main(sys.argv[2:])
    """
)


def test_a_failed_checkpoint_write_is_one_line_and_leaves_no_temporary(prepared, tmp_path, brillm):
    out = tmp_path / "out"
    recipe = write_recipe(tmp_path / "r.json", prepared, out)
    weights = (prepared / "model" / "model.safetensors").stat().st_size
    env = {**os.environ, "HF_HUB_OFFLINE": "1", "OMP_NUM_THREADS": "1", "PYTHONPATH": str(REPO)}
    command = [sys.executable, "-c", SAVE_LIMITED, str(weights // 2), "train", "--config", str(recipe)]
    result = subprocess.run(command, capture_output=True, text=True, env=env, timeout=300)
    assert result.returncode == 2, result.stderr[-3000:]
    message = result.stderr.strip().splitlines()[-1]
    assert message.startswith(f"error: no space left to write a checkpoint in {out}: it needs about ")
    assert "Traceback" not in result.stderr
    assert not list(out.glob(".tmp-*")) and not list(out.glob("checkpoint-*"))
    status, _, err = brillm("train", "--config", recipe, "--resume")  # room again: the run goes through
    assert status == 0, err


def test_a_full_disk_is_refused_before_writing(prepared, tmp_path, brillm):
    if os.geteuid() != 0:
        pytest.skip("mounting a small tmpfs (the full disk) needs root")
    disk = tmp_path / "disk"
    disk.mkdir()
    subprocess.run(["mount", "-t", "tmpfs", "-o", "size=64k", "tmpfs", str(disk)], check=True)
    try:
        recipe = write_recipe(tmp_path / "r.json", prepared, disk / "out")
        message = one_error_line(brillm("train", "--config", recipe))
        assert message.startswith(f"error: no space left to write a checkpoint in {disk / 'out'}: it needs about ")
        needed, free = (int(word.replace(",", "")) for word in message.split() if word.replace(",", "").isdigit())
        assert needed > free
        assert sorted(path.name for path in (disk / "out").iterdir()) == [".brillm.lock"]
    finally:
        subprocess.run(["umount", str(disk)], check=True)


# ----------------------------------------------------------------------------------------------------------------
# 5. The converter never replaces a training output


def test_an_output_that_is_a_file_is_refused_by_the_converter_and_prepare(fixture_dir, tmp_path):
    target = tmp_path / "out"
    target.write_text("mine")
    (tmp_path / "corpus.txt").write_text(CORPUS)
    files = (fixture_dir / "model.bin", fixture_dir / "vocab.json", fixture_dir / "word_frequency.json")
    with pytest.raises(ValueError, match=f"{target} exists and is not a folder; choose another --output"):
        converter.convert(*files, target)
    with pytest.raises(ValueError, match=f"{target} exists and is not a folder; choose another --output"):
        prepare([tmp_path / "corpus.txt"], target, hidden_size=2, log=None)
    assert target.read_text() == "mine"


def test_the_converter_refuses_a_training_output(prepared, fixture_dir, converted_fixture, tmp_path):
    run = shutil.copytree(converted_fixture, tmp_path / "run")  # a final model ...
    checkpoint = run / "checkpoint-20"  # ... and the checkpoints beside it
    checkpoint.mkdir()
    (checkpoint / "trainer_state.json").write_text("{}")
    (run / "eval_results.json").write_text("{}")
    before = snapshot(run)
    files = (fixture_dir / "model.bin", fixture_dir / "vocab.json", fixture_dir / "word_frequency.json")
    with pytest.raises(converter.ConversionError, match="checkpoint-20, which a conversion does not write"):
        converter.convert(*files, run)
    assert snapshot(run) == before


# ----------------------------------------------------------------------------------------------------------------
# 7. Missing or non-finite weights never load silently


@pytest.mark.parametrize("key", ["model.weights", "model.positions", "model.node_bias"])
def test_a_checkpoint_without_a_brillm_weight_is_refused(converted_fixture, tmp_path, key):
    folder = shutil.copytree(converted_fixture, tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    del tensors[key]
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=f"{key} is missing from the checkpoint"):
        BriLLMForCausalLM.from_pretrained(folder)


def test_non_finite_weights_are_refused_unless_allowed(converted_fixture, tmp_path, brillm, caplog):
    folder = shutil.copytree(converted_fixture, tmp_path / "m")
    tensors = load_file(folder / "model.safetensors")
    tensors["model.weights"][3, 0, 0] = float("nan")
    tensors["model.biases"][1, 0, 2] = float("inf")
    save_file(tensors, folder / "model.safetensors", metadata={"format": "pt"})
    with pytest.raises(ValueError, match=r"NaN or infinite weights in model.weights \(1\), model.biases \(1\)"):
        BriLLMForCausalLM.from_pretrained(folder)
    model = BriLLMForCausalLM.from_pretrained(folder, allow_non_finite_weights=True)
    assert torch.isnan(model.model.weights[3, 0, 0])
    assert "allow_non_finite_weights" in one_error_line(brillm("generate", folder, "--prompt-ids", "5,6"))
    before = snapshot(tmp_path)
    with pytest.raises(converter.ConversionError, match="NaN or infinite weights in model.weights"):
        exporter.export(folder, tmp_path / "model.bin")
    assert snapshot(tmp_path) == before  # nothing written

