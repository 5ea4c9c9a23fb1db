"""sha256 manifests of the training checkpoints, and the choice of the step a run resumes from.

Orbax commits a save by renaming its temporary folder, so a killed run leaves no half-written
step; it does not notice a file changed afterwards (a flipped bit on disk, a bad copy), and such a
state restores without complaint. So after orbax has finished a step, the trainer writes
``STEP/sha256_manifest.json``: the sha256 and size of every file of the step's folder, written to a
temporary file and renamed. A resume verifies the newest step against its manifest and falls back
to the newest one that passes; steps without a manifest (saved before manifests were written, or
killed between orbax's commit and the manifest) are used with a warning that they cannot be
verified. When every step fails, :class:`dngjax.checkpoint.CheckpointError` says so.
"""

from __future__ import annotations

import json
import os
import shutil
import time
from typing import Dict, Iterable, List, Optional, Tuple

from dngjax.checkpoint import CheckpointError, file_sha256 as _sha256

MANIFEST_FILE = "sha256_manifest.json"
FORMAT = 1

OK, UNVERIFIED, CORRUPT = "ok", "unverified", "corrupt"


def _files(step_dir: str) -> List[str]:
    """Every file under ``step_dir`` (relative paths, sorted), the manifest and its temporary file excepted."""
    out = []
    for root, _, names in os.walk(step_dir):
        for name in names:
            rel = os.path.relpath(os.path.join(root, name), step_dir)
            if not rel.startswith(MANIFEST_FILE):
                out.append(rel)
    return sorted(out)


def _fsync_dir(path: str) -> None:
    try:
        fd = os.open(path, os.O_RDONLY)
    except OSError:
        return
    try:
        os.fsync(fd)
    except OSError:
        pass
    finally:
        os.close(fd)


def write_manifest(step_dir: str, step: int) -> str:
    """Write ``step_dir/sha256_manifest.json`` (atomically) for the files orbax wrote; returns its path."""
    files = {rel: {"sha256": _sha256(os.path.join(step_dir, rel)),
                   "bytes": os.path.getsize(os.path.join(step_dir, rel))} for rel in _files(step_dir)}
    if not files:
        raise CheckpointError(f"{step_dir} holds no files: nothing to checksum")
    path = os.path.join(step_dir, MANIFEST_FILE)
    tmp = path + ".tmp"
    with open(tmp, "w") as f:
        json.dump({"format": FORMAT, "step": int(step), "files": files}, f, indent=1, sort_keys=True)
        f.flush()
        os.fsync(f.fileno())
    os.replace(tmp, path)
    _fsync_dir(step_dir)
    return path


def verify(step_dir: str) -> Tuple[str, str]:
    """``(status, detail)`` of one step's folder: ``ok``; ``unverified`` (no manifest); ``corrupt``,
    with ``detail`` naming the first file that is missing or whose size or sha256 differs."""
    path = os.path.join(step_dir, MANIFEST_FILE)
    if not os.path.isfile(path):
        return UNVERIFIED, f"no {MANIFEST_FILE}"
    try:
        with open(path) as f:
            manifest = json.load(f)
        files: Dict[str, Dict] = manifest["files"]
        if not isinstance(files, dict) or not files:
            raise ValueError("no files listed")
    except (OSError, ValueError, KeyError, TypeError) as e:
        return CORRUPT, f"its manifest {path} cannot be read ({type(e).__name__}: {e})"
    for rel in sorted(files):
        want = files[rel]
        full = os.path.join(step_dir, rel)
        if not os.path.isfile(full):
            return CORRUPT, f"{full} is missing"
        if os.path.getsize(full) != want.get("bytes"):
            return CORRUPT, f"{full} has {os.path.getsize(full)} bytes, its manifest says {want.get('bytes')}"
        if _sha256(full) != want.get("sha256"):
            return CORRUPT, f"sha256 of {full} does not match its manifest"
    return OK, f"{len(files)} files match their sha256"


def step_dir(ckpt_dir: str, step: int) -> str:
    """The folder of ``step`` under an orbax CheckpointManager's directory (its default step names)."""
    return os.path.join(ckpt_dir, str(int(step)))


def choose_step(ckpt_dir: str, steps: Iterable[int]) -> Tuple[Optional[int], str, List[Tuple[int, str]]]:
    """The newest step whose folder passes :func:`verify` or has no manifest, from the newest down.

    Returns ``(step, status, corrupt)``: ``step`` None when there are no steps; ``status`` ``ok`` or
    ``unverified``; ``corrupt`` the ``(step, detail)`` of the newer steps that failed. Raises
    :class:`CheckpointError` when every step fails (one line naming each)."""
    steps = sorted((int(s) for s in steps), reverse=True)
    corrupt: List[Tuple[int, str]] = []
    for s in steps:
        status, detail = verify(step_dir(ckpt_dir, s))
        if status != CORRUPT:
            return s, status, corrupt
        corrupt.append((s, detail))
    if corrupt:
        raise CheckpointError(
            f"no usable checkpoint in {ckpt_dir}: every saved step fails its sha256 check ("
            + "; ".join(f"step {s}: {d}" for s, d in corrupt)
            + f"); move {ckpt_dir} away to start the training over")
    return None, OK, corrupt


def set_aside(ckpt_dir: str, step: int, workdir: str) -> str:
    """Move a corrupt step's folder out of the CheckpointManager's directory (orbax would not save
    that step again while it exists) into ``WORKDIR/corrupt_checkpoints/``; returns where it went."""
    dest_root = os.path.join(workdir, "corrupt_checkpoints")
    os.makedirs(dest_root, exist_ok=True)
    base = os.path.join(dest_root, f"{int(step)}_{time.strftime('%Y%m%dT%H%M%S', time.gmtime())}")
    dest, n = base, 1
    while os.path.exists(dest):
        dest, n = f"{base}_{n}", n + 1
    shutil.move(step_dir(ckpt_dir, step), dest)
    return dest
