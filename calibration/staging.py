"""Atomic bundle updates: new files are written into a hidden staging folder inside the bundle,
then renamed into place, and manifest.json is rewritten last (write a temp file, rename).

An interrupted or failed run before the commit leaves the bundle exactly as it was (the staging
folder is removed; one left by a killed process is removed by the next run). During the commit
Ctrl-C is held back until the manifest is written. Files the old manifest still points to are
first unlisted (the manifest is rewritten without them) before being replaced, so even a crash in
the middle of a commit leaves a bundle that loads, just without the flavour being replaced.
"""
from __future__ import annotations

import contextlib
import json
import os
import shutil
import signal
import threading
from typing import Any, Callable, Iterator, Mapping

from molmo_edge.runtime.bundle import MANIFEST
from molmo_edge.runtime.files import write_json_atomic

STAGING_PREFIX = ".molmo-edge-staging-"


def _alive(pid: int) -> bool:
    try:
        os.kill(pid, 0)
    except ProcessLookupError:
        return False
    except PermissionError:
        return True
    return True


def clean_stale(bundle_dir: str) -> None:
    """Remove staging folders left by processes that no longer run."""
    for name in os.listdir(bundle_dir):
        if name.startswith(STAGING_PREFIX):
            try:
                pid = int(name[len(STAGING_PREFIX):].split("-")[0])
            except ValueError:
                continue
            if pid != os.getpid() and not _alive(pid):
                shutil.rmtree(os.path.join(bundle_dir, name), ignore_errors=True)


@contextlib.contextmanager
def staging(bundle_dir: str, tag: str) -> Iterator[str]:
    """A fresh staging folder inside the bundle, removed on exit whatever happens."""
    path = os.path.join(bundle_dir, f"{STAGING_PREFIX}{os.getpid()}-{tag}")
    try:
        clean_stale(bundle_dir)
        shutil.rmtree(path, ignore_errors=True)
        os.makedirs(path)
    except OSError as e:
        from molmo_edge.calibration import CalibrationError
        raise CalibrationError(f"cannot write into bundle {bundle_dir} ({e.strerror}); copy the bundle to a writable "
                               "folder and run the command there") from None
    try:
        yield path
    finally:
        shutil.rmtree(path, ignore_errors=True)


def read_manifest(bundle_dir: str) -> dict[str, Any]:
    with open(os.path.join(bundle_dir, MANIFEST), encoding="utf-8") as f:
        return json.load(f)


def write_manifest(bundle_dir: str, manifest: Mapping[str, Any]) -> None:
    write_json_atomic(os.path.join(bundle_dir, MANIFEST), manifest)


def referenced_files(manifest: Mapping[str, Any]) -> dict[str, list[str]]:
    """file -> the manifest keys that point at it (graphs.<key>, calibration)."""
    refs: dict[str, list[str]] = {}
    for key, g in manifest.get("graphs", {}).items():
        for f in (g.get("file"), g.get("data")):
            if f:
                refs.setdefault(f, []).append(f"graphs.{key}")
    cal = manifest.get("calibration") or {}
    for f in cal.get("files", []):
        refs.setdefault(f, []).append("calibration")
    return refs


def _drop(manifest: dict[str, Any], keys: set[str]) -> dict[str, Any]:
    out = json.loads(json.dumps(manifest))
    for k in keys:
        if k.startswith("graphs."):
            out.get("graphs", {}).pop(k[len("graphs."):], None)
        else:
            out.pop(k, None)
    return out


@contextlib.contextmanager
def _hold_sigint() -> Iterator[list[int]]:
    got: list[int] = []
    if threading.current_thread() is not threading.main_thread():
        yield got
        return
    old = signal.getsignal(signal.SIGINT)
    signal.signal(signal.SIGINT, lambda signum, frame: got.append(signum))
    try:
        yield got
    finally:
        signal.signal(signal.SIGINT, old)


def commit(bundle_dir: str, stage: str, files: Mapping[str, str],
           update: Callable[[dict[str, Any]], dict[str, Any]], replaces: set[str] = frozenset()) -> dict[str, Any]:
    """Move staged files (staged relative path -> bundle relative path) into the bundle and write
    the manifest `update(current manifest)`. `replaces`: manifest keys the update rewrites (e.g.
    "graphs.vision.int8", "calibration"); their old files are removed once nothing points at them."""
    current = read_manifest(bundle_dir)
    refs = referenced_files(current)
    targets = set(files.values())
    clash = {k for t in targets for k in refs.get(t, [])}
    old_files = {f for f, keys in refs.items() if set(keys) & set(replaces)}
    new_manifest = update(json.loads(json.dumps(current)))
    umask = os.umask(0)
    os.umask(umask)
    for src in files:  # some writers (onnx's external data) create files owner-only; match the bundle's others
        os.chmod(os.path.join(stage, src), 0o666 & ~umask)
    with _hold_sigint() as interrupted:
        if clash:  # unlist what is about to be overwritten: a crash from here on leaves a loadable bundle
            write_manifest(bundle_dir, _drop(current, clash | set(replaces)))
        for src, dst in files.items():
            full = os.path.join(bundle_dir, dst)
            os.makedirs(os.path.dirname(full), exist_ok=True)
            os.replace(os.path.join(stage, src), full)
        write_manifest(bundle_dir, new_manifest)
        still = set(referenced_files(new_manifest))
        for f in old_files - still - targets:
            with contextlib.suppress(OSError):
                os.remove(os.path.join(bundle_dir, f))
    if interrupted:
        raise KeyboardInterrupt
    return new_manifest
