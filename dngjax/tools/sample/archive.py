"""Keep the small, durable record of finished runs in the repository (``docs/runs/``).

  python sample/main.py --job=archive --runs=outputs/protocol_cpu --out=docs/runs/protocol_cpu
  python sample/main.py --job=summary --runs=docs/runs/protocol_cpu,docs/runs/protocol_cpu/conditional

A run folder holds hundreds of MB (chunks, per-point arrays, features); a machine can be replaced
between runs and ``outputs/`` is not versioned, so what the docs' numbers come from is copied here:
every run's ``config.json``, ``results.json`` (every grid point's statistics), ``labels.npz`` (the
classifier's label of every sample), and every folder's ``report.json`` / ``report.md`` (the verdicts,
read by ``--job=summary``), ``selection.json`` / ``selection.md`` (read by nothing; the choice),
``summary.md`` and ``timings.txt``. ``--job=summary`` and ``--job=select`` run on the copy; the report,
which pools seeds and resamples FD from features, needs the full run.
Unfinished runs (``*.partial``), runs moved aside by ``config.overwrite`` (``*.old-<UTC time>``) and the
bulky folders inside runs are skipped.
"""

from __future__ import annotations

import os
import shutil
from typing import List, Optional, Tuple

KEPT = ("config.json", "results.json", "labels.npz", "report.json", "report.md", "selection.json",
        "selection.md", "summary.md", "timings.txt")
SKIPPED_DIRS = ("points", "chunks")
MAX_BYTES = 2 ** 20          # a kept file larger than this is a mistake (e.g. a results.json with arrays)


def files_to_keep(root: str) -> List[str]:
    """The paths under ``root`` (relative to it) that the archive keeps, sorted."""
    if not os.path.isdir(root):
        raise FileNotFoundError(f"{root}: no such folder")
    kept = []
    for folder, dirs, files in os.walk(root):
        dirs[:] = sorted(d for d in dirs if d not in SKIPPED_DIRS and not d.endswith(".partial") and ".old-" not in d)
        kept += [os.path.relpath(os.path.join(folder, f), root) for f in files if f in KEPT]
    if not any(os.path.basename(p) in ("results.json", "report.json", "selection.json") for p in kept):
        raise FileNotFoundError(f"{root}: no finished run, report or selection to archive")
    return sorted(kept)


def plan(root: str, out: str) -> List[str]:
    """:func:`files_to_keep` of ``root``, after checking that none is over ``MAX_BYTES`` and that ``out``
    is another folder (raises ValueError / FileNotFoundError before anything is copied)."""
    paths = files_to_keep(root)
    big = [(p, b) for p in paths if (b := os.path.getsize(os.path.join(root, p))) > MAX_BYTES]
    if big:
        raise ValueError(f"files over {MAX_BYTES // 2 ** 20} MiB, not archived: {big}")
    if os.path.abspath(out) == os.path.abspath(root):
        raise ValueError(f"--out={out} is the folder being archived")
    return paths


def archive(root: str, out: str, paths: Optional[List[str]] = None) -> List[Tuple[str, int]]:
    """Copy ``paths`` (default: :func:`plan` of ``root``) into ``out`` (same relative paths; existing
    copies are replaced). Returns (relative path, bytes) of every copied file."""
    paths = plan(root, out) if paths is None else paths
    copied = []
    for p in paths:
        dst = os.path.join(out, p)
        os.makedirs(os.path.dirname(dst), exist_ok=True)
        shutil.copyfile(os.path.join(root, p), dst)
        copied.append((p, os.path.getsize(dst)))
    return copied
