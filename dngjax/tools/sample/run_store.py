"""Class removal's run folders: what a run is (its config and the sha256 of every file it reads), the
finished grid points kept for resuming, moving another run's folder aside, publishing a finished run.

The public API the report, selection and extend jobs use: :func:`identity`, :func:`differences`,
:func:`run_record`, :func:`input_files`, :func:`is_moved_aside`, :func:`provenance_text`, :data:`RECORD_KEYS`,
:data:`GRID_FIELDS`."""

from __future__ import annotations

import datetime
import json
import os
import shutil
import subprocess
from typing import Any, Dict, List, Optional, Tuple

import numpy as np

from dngjax.renames import VARIANCE_VALUES
from dngjax.tools import SOURCE_ROOT as REPO_ROOT
from dngjax.tools.sample.inputs import resolve_path
from dngjax.tools.sample.methods import method_key
from dngjax.tools.sample.scoring import PER_SAMPLE


def _is_previous_run(path: str) -> bool:
    return os.path.isfile(os.path.join(path, "results.json")) and os.path.isfile(os.path.join(path, "config.json"))


def config_json(config) -> Dict[str, Any]:
    d = json.loads(config.to_json_best_effort())
    d.pop("progress", None)
    return d


# config fields that choose which grid points a run has, not how any one point is sampled or scored
# (select_ceiling: read by --job=select only)
GRID_FIELDS = ("methods", "grid", "method_grids", "baseline", "grid_images", "outdir", "select_ceiling")


#: config fields that are no part of a run's identity: its grid, where it is written, and how
NOT_IDENTITY = GRID_FIELDS + ("progress", "overwrite")


#: config.json's entries beside the config's fields: the files the run read (path and sha256) and the
#: software it ran on (package versions, git commit; recorded, no part of the identity)
RECORD_KEYS = ("inputs", "environment")


#: inputs recorded but no part of the identity: the data set is read only to compute the reference
#: statistics, whose file (and hash) the identity has
_RECORD_ONLY_INPUTS = ("dataset",)


_SHA256: Dict[Tuple[str, int, int, int], str] = {}


def file_sha256(path: str) -> str:
    """sha256 (hex) of a file's bytes, computed once per process for each (path, inode, size, mtime)."""
    st = os.stat(path)
    key = (os.path.abspath(path), st.st_ino, st.st_size, st.st_mtime_ns)
    if key not in _SHA256:
        from dngjax.checkpoint import file_sha256 as sha256
        _SHA256[key] = sha256(path)
    return _SHA256[key]


def _dataset_file(config) -> Optional[str]:
    """The offline data set file that :func:`dngjax.data.load_dataset` reads, if there is one."""
    from dngjax import data
    folder = data.resolve_data_dir(config.data_dir or None)
    for name in data._OFFLINE_FILES.get(config.dataset, ()) if folder else ():
        if os.path.isfile(os.path.join(folder, name)):
            return os.path.join(folder, name)
    return None


def input_files(config) -> Dict[str, str]:
    """Every model and reference file the run reads that exists now, by name: ``<field>/card.json`` and
    ``<field>/params.msgpack`` of the models (config.uncond and config.forget, or config.conditional; and
    config.classifier), ``reference_stats``, ``fid_weights`` (features="inception") and ``dataset`` (the
    data set file, read only when the reference statistics are computed)."""
    from dngjax import checkpoint
    fields = ["conditional"] if config.conditional else ["uncond", "forget"]
    files: Dict[str, str] = {}
    for field in fields + ["classifier"]:
        try:
            folder = checkpoint._model_dir(resolve_path(config[field], config))
            names = (checkpoint.CARD_FILE, checkpoint.load_card(folder).get("params_file", checkpoint.PARAMS_FILE))
        except checkpoint.CheckpointError:
            continue                                  # loading the model raises the error that says why
        for name in names:
            if os.path.isfile(os.path.join(folder, name)):
                files[f"{field}/{name}"] = os.path.join(folder, name)
    ref = resolve_path(config.reference_stats, config)
    if os.path.isfile(ref):
        files["reference_stats"] = ref
    elif config.compute_reference and _dataset_file(config):
        files["dataset"] = _dataset_file(config)
    if config.features == "inception":
        from dngjax.fid_inception import FID_WEIGHTS_ENV
        weights = config.fid_weights or os.environ.get(FID_WEIGHTS_ENV, "")
        if weights and os.path.isfile(weights):
            files["fid_weights"] = weights
    return files


_ENVIRONMENT: Dict[str, Any] = {}


def environment() -> Dict[str, Any]:
    """Package versions (jax, jaxlib, flax, numpy, dngjax) and the project's git commit (``git_commit``,
    None outside a git checkout; ``git_dirty``: uncommitted changes to tracked files)."""
    if not _ENVIRONMENT:
        import importlib.metadata
        import dngjax
        for pkg in ("jax", "jaxlib", "flax", "numpy"):
            try:
                _ENVIRONMENT[pkg] = importlib.metadata.version(pkg)
            except importlib.metadata.PackageNotFoundError:
                _ENVIRONMENT[pkg] = None
        _ENVIRONMENT["dngjax"] = dngjax.__version__

        def git(*args):
            try:
                r = subprocess.run(["git", *args], cwd=REPO_ROOT, capture_output=True, text=True, timeout=20)
            except (OSError, subprocess.SubprocessError):
                return None
            return r.stdout.strip() if r.returncode == 0 else None
        _ENVIRONMENT["git_commit"] = git("rev-parse", "HEAD") or None
        status = git("status", "--porcelain", "--untracked-files=no") if _ENVIRONMENT["git_commit"] else None
        _ENVIRONMENT["git_dirty"] = None if status is None else bool(status)
    return dict(_ENVIRONMENT)


def run_record(config, files: Dict[str, str]) -> Dict[str, Any]:
    """What config.json holds: the config's fields, ``inputs`` ({name: {"path", "sha256"}} of
    :func:`input_files`) and ``environment`` (:func:`environment`)."""
    d = config_json(config)
    d["inputs"] = {name: {"path": os.path.abspath(path), "sha256": file_sha256(path)}
                   for name, path in sorted(files.items())}
    d["environment"] = environment()
    return d


def identity(record: Dict[str, Any], skip: Tuple[str, ...] = ()) -> Dict[str, Any]:
    """What a finished grid point depends on, from a config.json (:func:`run_record`): the config without
    the choice of points, and the sha256 of every model and reference file (``inputs``: None for runs
    that did not record them). Two runs with the same identity share every point they have in common
    (same method and scale); versions and the git commit are recorded, not compared. Fields are compared
    in today's spelling (:func:`respelled`): a record written with an older name or value is the same run."""
    d = {k: v for k, v in respelled(record).items() if k not in NOT_IDENTITY + RECORD_KEYS}
    inputs = record.get("inputs")
    d["inputs"] = None if inputs is None else {
        k: v.get("sha256") for k, v in inputs.items() if k not in _RECORD_ONLY_INPUTS + tuple(skip)}
    return d


#: config fields renamed since runs were recorded: {old: new} within config.json's sections ("" = top level)
RENAMED_FIELDS = {"dng": {"variance": "update_variance"}}
#: fields whose values were respelled: {(section, field): {old value: new value}}
RESPELLED_VALUES = {("", "noise"): VARIANCE_VALUES, ("dng", "update_variance"): VARIANCE_VALUES}


def respelled(record: Dict[str, Any]) -> Dict[str, Any]:
    """A config.json record (a copy) with its older field names and values in today's spelling
    (``dng.variance`` -> ``dng.update_variance``, the variance value ``"posterior"`` -> ``"beta_tilde"``)."""
    d = dict(record)
    for section, names in RENAMED_FIELDS.items():
        if isinstance(d.get(section), dict):
            d[section] = {names.get(k, k): v for k, v in d[section].items()}
    for (section, name), values in RESPELLED_VALUES.items():
        part = d if not section else d.get(section)
        if isinstance(part, dict) and isinstance(part.get(name), str) and part[name] in values:
            part[name] = values[part[name]]
    return d


def _sampling_identity(config) -> Dict[str, Any]:
    """The config's part of the identity (:func:`identity` without the files)."""
    d = identity(config_json(config))
    d.pop("inputs")
    return d


def differences(old: Dict[str, Any], new: Dict[str, Any], skip: Tuple[str, ...] = ()) -> List[str]:
    """How two runs' identities differ (config.json records), one short item per field or file:
    ``n: 16 -> 8``, ``dng.prior: 0.25 -> 0.5``, ``/.../ddpm/params.msgpack sha256 ab12.. -> cd34..``."""
    a, b = identity(old, skip), identity(new, skip)
    show = lambda v: "(absent)" if v is _ABSENT else json.dumps(v, sort_keys=True)
    defaults = _config_defaults()
    # a field added to the config (e.g. a new rule hyperparameter) is absent from older records: at its
    # default value it changes nothing, so it is not a difference
    same = lambda x, y, d: x == y or (x is _ABSENT and y == d) or (y is _ABSENT and x == d)
    out = []
    for key in sorted((set(a) | set(b)) - {"inputs"}):
        va, vb = a.get(key, _ABSENT), b.get(key, _ABSENT)
        if same(va, vb, defaults.get(key, _ABSENT)):
            continue
        if isinstance(va, dict) and isinstance(vb, dict):
            dk = defaults.get(key) if isinstance(defaults.get(key), dict) else {}
            out += [f"{key}.{k}: {show(va.get(k, _ABSENT))} -> {show(vb.get(k, _ABSENT))}"
                    for k in sorted(set(va) | set(vb))
                    if not same(va.get(k, _ABSENT), vb.get(k, _ABSENT), dk.get(k, _ABSENT))]
        else:
            out.append(f"{key}: {show(va)} -> {show(vb)}")
    ia, ib = a["inputs"], b["inputs"]
    if ia is None or ib is None:
        if ia != ib:
            out.append("model and reference sha256: " + ("not recorded in its config.json -> recorded"
                                                          if ia is None else "recorded -> not recorded"))
        return out
    for name in sorted(set(ia) | set(ib)):
        if ia.get(name) != ib.get(name):
            entry = (new.get("inputs") or {}).get(name) or (old.get("inputs") or {}).get(name)
            short = lambda h: "(none)" if h is None else h[:12] + ".."
            out.append(f"{entry['path']} sha256 {short(ia.get(name))} -> {short(ib.get(name))}")
    return out


_ABSENT = object()


def _config_defaults() -> Dict[str, Any]:
    """The base config's fields as config.json writes them (what a field absent from an older record meant)."""
    from dngjax.tools.sample.configs import common
    return json.loads(json.dumps(config_json(common.base_config())))


def _read_record(folder: str) -> Optional[Dict[str, Any]]:
    try:
        with open(os.path.join(folder, "config.json")) as f:
            d = json.load(f)
        return d if isinstance(d, dict) else None
    except (OSError, ValueError):
        return None


def _holds_work(folder: str) -> bool:
    """Whether a work folder holds a finished grid point or chunk of seeds."""
    for sub in ("points", "chunks"):
        for _, _, names in os.walk(os.path.join(folder, sub)):
            if any(n.endswith(".npz") and not n.endswith(".tmp.npz") for n in names):
                return True
    return False


def partial_dir(outdir: str) -> str:
    """Where a run into ``outdir`` is written until it is complete."""
    return outdir.rstrip("/") + ".partial"


def check_folders(outdir: str, record: Dict[str, Any], overwrite: bool = False,
                  skip: Tuple[str, ...] = ()) -> List[str]:
    """The folders of another run (another identity, :func:`differences`) at ``outdir`` (a finished run)
    and ``<outdir>.partial`` (an interrupted one, with finished points or chunks) that ``overwrite``
    moves aside; without it such a folder raises ValueError, one line naming the difference and the
    ways on. An interrupted run that finished nothing is no run: it is replaced."""
    aside = []
    if os.path.isdir(outdir) and os.listdir(outdir):
        if not _is_previous_run(outdir):
            raise ValueError(f"config.outdir={outdir} exists and is not the output of an earlier class-removal run "
                             "(no results.json): choose another --config.outdir (it is never replaced)")
    for folder, what in ((outdir, "a finished run"), (partial_dir(outdir), "an interrupted run")):
        if folder == outdir and not (os.path.isdir(outdir) and os.listdir(outdir)):
            continue
        if folder != outdir and not (os.path.isdir(folder) and _holds_work(folder)):
            continue
        old = _read_record(folder)
        diff = ["its config.json is missing or unreadable"] if old is None else differences(old, record, skip)
        if not diff:
            continue
        if overwrite:
            aside.append(folder)
            continue
        more = f"; and {len(diff) - 6} more" if len(diff) > 6 else ""
        raise ValueError(f"{folder} holds {what} of another config or other model files ({'; '.join(diff[:6])}{more}): "
                         f"choose another --config.outdir, or pass --config.overwrite=True to move it aside to "
                         f"{folder.rstrip('/')}.old-<UTC time> (nothing is deleted)")
    return aside


def move_aside(folder: str) -> str:
    """Rename ``folder`` to ``<folder>.old-<UTC time>`` (never deleted); returns the new name."""
    stamp = datetime.datetime.now(datetime.timezone.utc).strftime("%Y%m%d-%H%M%S")
    base = folder.rstrip("/") + f".old-{stamp}"
    dst, i = base, 1
    while os.path.exists(dst):
        dst, i = f"{base}-{i}", i + 1
    os.replace(folder, dst)
    return dst


def is_moved_aside(folder: str) -> bool:
    """Whether ``folder`` is a run moved aside by ``config.overwrite`` (``<outdir>.old-<UTC time>``)."""
    return ".old-" in os.path.basename(os.path.normpath(folder))


def _point_file(method: str, scale: float) -> str:
    name = "none" if method == "none" else method_key(method)
    return f"{name}_s{scale:g}.npz"


def reusable_points(job, work: str, outdir: str, read_only: bool = False) -> Dict[str, Any]:
    """Finished grid points for this config, by their key in it (``NP_0``, ...), from an interrupted run
    (``work``) or a finished one (``outdir``) with the same sampling identity, whatever their grids were.

    A finished run's point files are copied into ``work`` (kept even where this config's grid no longer
    has them, so that a later, larger grid reuses them too). Folders of another identity were refused
    or moved aside by :func:`prepare` / :func:`execute`; an interrupted run of another identity that
    finished nothing is replaced. Points are matched by method and scale, never by position in the grid.
    ``read_only``: only read ``work``'s points (the other processes of a multi-process run, once process 0
    has prepared ``work``)."""
    config = job.config
    if os.path.isdir(work) and not read_only:
        old = _read_record(work)
        if old is None or differences(old, job.record):
            if _holds_work(work):                     # prepare refuses these: it changed since
                raise RuntimeError(f"{work} now holds another run's points; not touched")
            print(f"replacing {work}: an interrupted run of another config that finished no point", flush=True)
            shutil.rmtree(work)
    if not read_only:
        os.makedirs(os.path.join(work, "points"), exist_ok=True)
    old = _read_record(outdir) if _is_previous_run(outdir) and not read_only else None
    if os.path.isdir(os.path.join(outdir, "points")) and old is not None and not differences(old, job.record):
        for name in os.listdir(os.path.join(outdir, "points")):
            dst = os.path.join(work, "points", name)
            if name.endswith(".npz") and not name.endswith(".tmp.npz") and not os.path.exists(dst):
                shutil.copy2(os.path.join(outdir, "points", name), dst)
    wanted = {("none", 0.0): "none_0"} if config.baseline else {}
    for m, _, _, scales in job.methods:
        for k, s in enumerate(scales):
            wanted[(method_key(m), round(float(s), 12))] = f"{method_key(m)}_{k}"
    done: Dict[str, Any] = {}
    found = 0
    for name in sorted(os.listdir(os.path.join(work, "points"))):
        if not name.endswith(".npz") or name.endswith(".tmp.npz"):
            continue
        row, preview, trace_part, samples = load_point(os.path.join(work, "points", name))
        found += 1
        method = "none" if row["method"] == "none" else method_key(row["method"])
        key = wanted.get((method, round(float(row["scale"]), 12)))
        if key is not None:
            row["key"] = key
            done[key] = (row, preview, trace_part, samples)
    if found and not read_only:
        print(f"reusing {len(done)} finished grid point(s) of {len(wanted)} "
              f"({found} on disk for this config and the same model and reference files)", flush=True)
    return done


def save_point(work: str, row: Dict[str, Any], preview: np.ndarray, trace_part: Dict[str, Any],
                samples: Optional[np.ndarray]) -> None:
    """One finished grid point, so that an interrupted run never recomputes it."""
    path = os.path.join(work, "points", _point_file(row["method"], row["scale"]))
    arrays = {f"trace_{k}": np.asarray(v) for k, v in trace_part.items() if v is not None}
    if samples is not None:
        arrays["samples"] = samples
    meta = {k: v for k, v in row.items() if k not in PER_SAMPLE}
    if row.get("features") is not None:
        arrays["features"] = row["features"]
    tmp = path + ".tmp.npz"
    np.savez(tmp, meta=np.asarray(json.dumps(meta)), labels=row["labels"].astype(np.int16),
             preview=preview.astype(np.float32), **arrays)
    os.replace(tmp, path)


def load_point(path: str):
    with np.load(path) as f:
        row = json.loads(str(f["meta"]))
        row["labels"] = f["labels"].astype(np.int64)
        if "features" in f.files:
            row["features"] = f["features"]
        trace_part = {k[len("trace_"):]: f[k] for k in f.files if k.startswith("trace_")}
        return row, f["preview"], trace_part, (f["samples"] if "samples" in f.files else None)


def provenance_text(record: Dict[str, Any]) -> str:
    """Two lines for summary.txt and report.md: the inputs' sha256 (first 12 hex digits) and the software."""
    inputs = record.get("inputs")
    files = ("not recorded" if inputs is None else
             ", ".join(f"{k} {v['sha256'][:12]}" for k, v in inputs.items()) or "none")
    env = record.get("environment") or {}
    commit = env.get("git_commit")
    software = (", ".join(f"{k} {env[k]}" for k in ("jax", "flax", "numpy", "dngjax") if env.get(k))
                + ", git " + ("unknown" if not commit else commit[:12] + (" + uncommitted changes"
                                                                         if env.get("git_dirty") else "")))
    return f"inputs (sha256): {files}\nsoftware: {software if env else 'not recorded'}"


def publish(work: str, outdir: str, record: Dict[str, Any]) -> None:
    """Rename the complete ``work`` folder to ``outdir``. An earlier run there of the same identity is
    replaced once every point file of it is in ``work`` (copied by :func:`reusable_points`); anything
    else there is moved aside (``<outdir>.old-<UTC time>``), never deleted."""
    if os.path.isdir(outdir):
        old = _read_record(outdir) if _is_previous_run(outdir) else None
        points = os.path.join(outdir, "points")
        kept = os.path.isdir(points) and all(
            os.path.isfile(os.path.join(work, "points", n)) for n in os.listdir(points)
            if n.endswith(".npz") and not n.endswith(".tmp.npz"))
        if not os.listdir(outdir):
            os.rmdir(outdir)
        elif old is not None and kept and not differences(old, record):
            replaced = move_aside(outdir)             # its points live on in the new folder
            os.replace(work, outdir)
            shutil.rmtree(replaced)
            return
        else:
            print(f"moved {outdir} aside to {move_aside(outdir)}: it held another run's results", flush=True)
    os.makedirs(os.path.dirname(os.path.abspath(outdir)), exist_ok=True)
    os.replace(work, outdir)
