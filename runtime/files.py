"""The few helpers every stage needs, once: atomic writes, progress lines, element counts.

Atomic means a reader (or a crash) never sees half a file under the final name: write next to it
under a hidden/partial name, flush, then `os.replace`, which is atomic on one filesystem.
"""
from __future__ import annotations

import contextlib
import json
import math
import os
import shutil
import sys
import tempfile
import time
from typing import Any, Callable, Iterator, Sequence

Progress = Callable[[str], None]


def say(msg: str) -> None:
    """The default progress printer: one line on stderr (stdout stays clean for --json)."""
    print(msg, file=sys.stderr, flush=True)


def timed(progress: Progress, prefix: str) -> Progress:
    """A progress printer that prefixes each line with `[prefix m:ss.s]` elapsed since it was made."""
    t0 = time.perf_counter()

    def out(msg: str) -> None:
        s = time.perf_counter() - t0
        progress(f"[{prefix} {int(s // 60)}:{s % 60:04.1f}] {msg}")
    return out


def numel(shape: Sequence[int]) -> int:
    return int(math.prod(int(d) for d in shape))


def _umask() -> int:
    mask = os.umask(0o022)
    os.umask(mask)
    return mask


_UMASK = _umask()  # read once, at import: os.umask can only be read by setting it


def _partial(path: str, suffix: str = "") -> str:
    """A fresh partial name beside `path` (unique per call: concurrent writers of the same file never share one),
    with the permissions open() would give (mkstemp's are 0600: a bundle exported by one user could not be read
    by the service user that serves it)."""
    d = os.path.dirname(os.path.abspath(path))
    os.makedirs(d, exist_ok=True)
    fd, tmp = tempfile.mkstemp(dir=d, prefix=f".{os.path.basename(path)}.partial-", suffix=suffix)
    os.fchmod(fd, 0o666 & ~_UMASK)
    os.close(fd)
    return tmp


def write_bytes_atomic(path: str | os.PathLike, data: bytes) -> None:
    path = os.fspath(path)
    tmp = _partial(path)
    try:
        with open(tmp, "wb") as f:
            f.write(data)
            f.flush()
            os.fsync(f.fileno())
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


def write_text_atomic(path: str | os.PathLike, text: str) -> None:
    write_bytes_atomic(path, text.encode("utf-8"))


def write_json_atomic(path: str, obj: Any) -> None:
    write_text_atomic(path, json.dumps(obj, indent=2) + "\n")


@contextlib.contextmanager
def atomic_path(path: str | os.PathLike) -> Iterator[str]:
    """Yield a partial path to write (by any library or tool: np.savez, a compiler's -o...); renamed into place
    on success, removed on failure. The partial name keeps the final suffix so tools that look at it behave."""
    path = os.fspath(path)
    tmp = _partial(path, os.path.splitext(path)[1])
    try:
        yield tmp
        os.replace(tmp, path)
    finally:
        if os.path.exists(tmp):
            os.remove(tmp)


@contextlib.contextmanager
def atomic_folder(out: str) -> Iterator[str]:
    """Yield a hidden sibling folder to fill; on success it replaces `out` (an existing `out` is swapped out
    and removed only after the new one is in place); on failure nothing of it remains."""
    parent = os.path.dirname(os.path.abspath(out)) or "."
    os.makedirs(parent, exist_ok=True)
    tmp = os.path.join(parent, f".{os.path.basename(os.path.abspath(out))}.partial-{os.getpid()}")
    shutil.rmtree(tmp, ignore_errors=True)
    os.makedirs(tmp)
    try:
        yield tmp
        if os.path.exists(out):
            old = tmp + ".old"
            os.replace(out, old)
            os.replace(tmp, out)
            shutil.rmtree(old, ignore_errors=True)
        else:
            os.replace(tmp, out)
    finally:
        shutil.rmtree(tmp, ignore_errors=True)
