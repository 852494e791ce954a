"""Writing outputs without losing anything: folders built next to their target and swapped in at the end, a lock
per training folder, and one-line errors for a full disk.

Every command that writes a folder (``brillm prepare``, the converter, the final model of ``brillm train``) builds
it in a hidden staging folder beside the target (same file system, so the final rename is atomic) and only
replaces the target once all inputs were checked and the work succeeded; a failure removes the staging folder and
leaves the target as it was. Before replacing a target, its owner checks that it holds nothing it did not write.

Example:

```python
>>> import tempfile
>>> target = Path(tempfile.mkdtemp()) / "out"
>>> with staged_folder(target) as staging:
...     _ = (staging / "a.txt").write_text("new")
>>> sorted(path.name for path in target.parent.iterdir()), (target / "a.txt").read_text()
(['out'], 'new')
>>> with staged_folder(target) as staging:
...     _ = (staging / "a.txt").write_text("half")
...     raise RuntimeError("the work failed")
Traceback (most recent call last):
...
RuntimeError: the work failed
>>> sorted(path.name for path in target.parent.iterdir()), (target / "a.txt").read_text()
(['out'], 'new')

```
"""

import errno
import fcntl
import json
import os
import shutil
import socket
import tempfile
from contextlib import contextmanager
from pathlib import Path


class OutputFolderError(ValueError):
    """An output that cannot be written without losing something (the message names it and what to do)."""


def holds_anything(target):
    """Whether the output ``target`` holds anything a new output would replace: `False` for a missing or empty
    folder; `OutputFolderError` where it is a file (never replaced by a folder)."""
    target = Path(target)
    if target.exists() and not target.is_dir():
        raise OutputFolderError(f"{target} exists and is not a folder; choose another --output.")
    return target.is_dir() and any(target.iterdir())


def current_umask():
    """The process's file-creation mask (new files get ``0o666 & ~mask``, folders ``0o777 & ~mask``)."""
    mask = os.umask(0)
    os.umask(mask)
    return mask


@contextmanager
def staged_folder(target):
    """Yield an empty folder next to ``target``; on success it replaces ``target``, on any error it is removed."""
    target = Path(target)
    target.parent.mkdir(parents=True, exist_ok=True)
    staging = Path(tempfile.mkdtemp(dir=target.parent, prefix=f".{target.name}.partial-"))
    try:
        staging.chmod(0o777 & ~current_umask())  # mkdtemp makes it private; the result is an ordinary folder
        yield staging
        replace_folder(staging, target)
    except BaseException:
        shutil.rmtree(staging, ignore_errors=True)
        raise


def replace_folder(staging, target):
    """Move the finished folder ``staging`` to ``target``, replacing what is there (two renames, then a delete)."""
    staging, target = Path(staging), Path(target)
    if not target.exists():
        os.rename(staging, target)
        return
    previous = staging.with_name(staging.name + ".previous")
    os.rename(target, previous)
    os.rename(staging, target)
    shutil.rmtree(previous)


def files_under(folder):
    """Relative POSIX paths of every file below ``folder``, sorted (the manifest of a written folder)."""
    folder = Path(folder)
    return sorted(path.relative_to(folder).as_posix() for path in folder.rglob("*") if not path.is_dir())


def tree_bytes(folder):
    """Bytes of all files below ``folder`` (0 when it does not exist)."""
    return sum(path.stat().st_size for path in Path(folder).rglob("*") if path.is_file())


# ----------------------------------------------------------------------------------------------------------------
# Disk space


# What a full disk (ENOSPC), a full quota (EDQUOT) or a file-size limit (EFBIG) looks like in the messages of the
# writers that do not raise `OSError`: torch's zip writer (`RuntimeError`) and safetensors (`SafetensorError`).
_NO_SPACE_TEXTS = ("no space left", "os error 28", "quota", "os error 122", "file too large", "os error 27",
                   "unexpected pos", "file write failed")  # fmt: skip


def is_disk_full(error):
    """Whether ``error`` is a write that ran out of space (or of the allowed file size), whichever writer raised it."""
    if isinstance(error, OSError) and error.errno is not None:
        return error.errno in (errno.ENOSPC, errno.EDQUOT, errno.EFBIG)
    return any(text in str(error).lower() for text in _NO_SPACE_TEXTS)


def disk_full_message(folder, needed):
    """One line for a write that ran out of space: the folder, the bytes the write needs and those free."""
    free = shutil.disk_usage(folder).free
    return (
        f"no space left to write a checkpoint in {folder}: it needs about {needed:,} bytes and {free:,} are free "
        "(or the file-size limit is lower); free some space (or set train.save_total_limit to keep fewer "
        "checkpoints) and run again with --resume."
    )


def check_free_space(folder, needed):
    """Raise `OutputFolderError` (`disk_full_message`) before writing ``needed`` bytes into ``folder`` if they do
    not fit."""
    if shutil.disk_usage(folder).free < needed:
        raise OutputFolderError(disk_full_message(folder, needed))


# ----------------------------------------------------------------------------------------------------------------
# Locking a folder for one run


class FolderLock:
    """An exclusive lock on a folder for one run, held through ``flock`` on ``folder/.brillm.lock``.

    The kernel drops the lock when its process ends, however it ends, so a lock left by a dead process never blocks
    the next run; the file only records who holds it (pid and host) for the error message.

    Example:

    ```python
    >>> import tempfile
    >>> folder = tempfile.mkdtemp()
    >>> with FolderLock(folder):
    ...     FolderLock(folder).acquire()
    Traceback (most recent call last):
    ...
    modeling_brillm.output_folders.OutputFolderError: ... is in use by another run (pid ..., host ...): wait for it to end or choose another output folder.
    >>> with FolderLock(folder):  # released at the end of the first block
    ...     pass

    ```
    """

    NAME = ".brillm.lock"

    def __init__(self, folder):
        self.path = Path(folder) / self.NAME
        self._file = None

    def acquire(self):
        self.path.parent.mkdir(parents=True, exist_ok=True)
        file = open(self.path, "a+", encoding="utf-8")
        try:
            fcntl.flock(file, fcntl.LOCK_EX | fcntl.LOCK_NB)
        except BlockingIOError:
            file.seek(0)
            try:
                holder = json.loads(file.read() or "{}")
            except ValueError:
                holder = {}
            file.close()
            raise OutputFolderError(
                f"{self.path.parent} is in use by another run (pid {holder.get('pid', '?')}, host "
                f"{holder.get('host', '?')}): wait for it to end or choose another output folder."
            ) from None
        file.seek(0)
        file.truncate()
        file.write(json.dumps({"pid": os.getpid(), "host": socket.gethostname()}))
        file.flush()
        self._file = file
        return self

    def release(self):
        if self._file is not None:
            self._file.close()  # closing the descriptor drops the flock
            self._file = None

    def __enter__(self):
        return self.acquire()

    def __exit__(self, *exc_info):
        self.release()


__all__ = [
    "FolderLock",
    "OutputFolderError",
    "check_free_space",
    "current_umask",
    "disk_full_message",
    "files_under",
    "holds_anything",
    "is_disk_full",
    "replace_folder",
    "staged_folder",
    "tree_bytes",
]
