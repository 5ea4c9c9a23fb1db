"""Several processes, one job: JAX's own distributed runtime (``jax.distributed``), set up once per process.

Every tool of the project (``train/main.py``, ``sample/main.py``, ``python -m experiments.gmm``) calls
:func:`initialize` first, from its flags ``--coordinator_address``, ``--num_processes``,
``--process_id`` and ``--local_device_ids`` (see :func:`define_flags`). With one process it does
nothing. With several, each process runs the same command; the processes then see one global list of
devices (``jax.devices()``), and

* :func:`dngjax.sampler.sample` / :func:`~dngjax.sampler.sweep` shard each chunk's seeds over all of
  them and give every process the whole result (seed for seed the single-process result);
* training (:mod:`dngjax.tools.train.trainer`) is data-parallel over all of them: ``config.batch_size``
  is the global batch, each process reads its own rows of it, checkpoints are written by all processes
  together (orbax), logs, metrics and the model by process 0 only.

Where the settings come from, first match wins:

1. the arguments (the flags);
2. the environment variables ``DNGJAX_COORDINATOR`` (``host:port`` of process 0),
   ``DNGJAX_NUM_PROCESSES``, ``DNGJAX_PROCESS_ID`` and ``DNGJAX_LOCAL_DEVICE_IDS`` (``0,1``), each
   read when its argument is not given;
3. a cluster that starts the processes itself: SLURM (``srun``, more than one task), Open MPI
   (``mpirun``, more than one rank), a multi-host Cloud TPU slice (``TPU_WORKER_HOSTNAMES`` with
   several hosts), or ``DNGJAX_DISTRIBUTED=auto`` for any other cluster JAX detects
   (``jax.distributed.initialize()`` without arguments); what is not given is left to JAX's
   detection.

Nothing found, or ``num_processes=1``: a single process, nothing is started.

Inconsistent settings (a process id without a process count, an id out of range, several processes
without a coordinator, a coordinator that is not ``host:port``) raise :class:`ValueError` before
anything is started. On CPU, cross-process collectives need an implementation: gloo is selected.
"""

from __future__ import annotations

import os
from typing import Any, Optional, Sequence, Union

import numpy as np

ENV_COORDINATOR = "DNGJAX_COORDINATOR"
ENV_NUM_PROCESSES = "DNGJAX_NUM_PROCESSES"
ENV_PROCESS_ID = "DNGJAX_PROCESS_ID"
ENV_LOCAL_DEVICE_IDS = "DNGJAX_LOCAL_DEVICE_IDS"
ENV_AUTO = "DNGJAX_DISTRIBUTED"
ENV_TIMEOUT = "DNGJAX_INIT_TIMEOUT"

_initialized_here = False


def _int(value: Any, name: str) -> Optional[int]:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    try:
        return int(value)
    except (TypeError, ValueError):
        raise ValueError(f"{name} must be an integer, got {value!r}") from None


def _device_ids(value: Any) -> Optional[list]:
    if value is None or (isinstance(value, str) and not value.strip()):
        return None
    if isinstance(value, str):
        items = [v for v in value.replace(" ", "").split(",") if v]
    elif isinstance(value, int):
        items = [value]
    else:
        items = list(value)
    try:
        ids = [int(v) for v in items]
    except (TypeError, ValueError):
        raise ValueError(f"local_device_ids must be device numbers such as 0,1; got {value!r}") from None
    if not ids or min(ids) < 0 or len(set(ids)) != len(ids):
        raise ValueError(f"local_device_ids must be distinct device numbers >= 0, got {value!r}")
    return ids


def _check_address(address: str) -> str:
    host, colon, port = str(address).rpartition(":")
    if not colon or not host or not port.isdigit() or not 0 < int(port) < 65536:
        raise ValueError(f"coordinator_address must be host:port (process 0's address and a free port, "
                         f"e.g. 10.0.0.1:1234), got {address!r}")
    return str(address)


def cluster_detected() -> Optional[str]:
    """The name of the multi-process cluster environment this process runs in, or None.

    Read from the environment variables the launchers set (no network query): SLURM with more than one
    task, Open MPI with more than one rank, a Cloud TPU slice of several hosts, or ``DNGJAX_DISTRIBUTED=auto``.
    """
    env = os.environ
    if env.get(ENV_AUTO, "").strip().lower() in ("auto", "1", "true", "yes"):
        return "auto"
    slurm = ("SLURM_JOB_ID", "SLURM_STEP_NODELIST", "SLURM_NTASKS", "SLURM_PROCID", "SLURM_LOCALID")
    if all(v in env for v in slurm) and (_int(env.get("SLURM_NTASKS"), "SLURM_NTASKS") or 1) > 1:
        return "slurm"
    if "OMPI_MCA_orte_hnp_uri" in env and (_int(env.get("OMPI_COMM_WORLD_SIZE"), "OMPI_COMM_WORLD_SIZE") or 1) > 1:
        return "openmpi"
    hosts = [h for h in env.get("TPU_WORKER_HOSTNAMES", "").split(",") if h.strip()]
    if len(hosts) > 1:
        return "tpu"
    return None


def resolve(coordinator_address: Optional[str] = None, num_processes: Union[int, str, None] = None,
            process_id: Union[int, str, None] = None,
            local_device_ids: Union[str, int, Sequence[int], None] = None) -> Optional[dict]:
    """The keyword arguments of ``jax.distributed.initialize`` these settings ask for (None: one process,
    nothing to start), the arguments completed from the ``DNGJAX_*`` variables. :class:`ValueError` for
    inconsistent settings. Starts nothing (the check a tool makes before any work)."""
    env = os.environ
    address = coordinator_address if coordinator_address else (env.get(ENV_COORDINATOR) or None)
    n = _int(num_processes if num_processes is not None else env.get(ENV_NUM_PROCESSES), "num_processes")
    pid = _int(process_id if process_id is not None else env.get(ENV_PROCESS_ID), "process_id")
    ids = _device_ids(local_device_ids if local_device_ids is not None else env.get(ENV_LOCAL_DEVICE_IDS))
    if address is not None:
        _check_address(address)
    if n is not None and n < 1:
        raise ValueError(f"num_processes must be >= 1, got {n}")
    if pid is not None and pid < 0:
        raise ValueError(f"process_id must be >= 0, got {pid}")
    if n is not None and pid is not None and pid >= n:
        raise ValueError(f"process_id={pid} with num_processes={n}: the ids are 0..{n - 1}")
    cluster = cluster_detected()
    if n == 1:
        if address is not None and pid not in (None, 0):
            raise ValueError(f"num_processes=1 has the one process_id 0, got {pid}")
        return None
    if n is None and pid is None and address is None and ids is None and cluster is None:
        return None                                            # nothing asked: one process
    if cluster is None:
        missing = [name for name, v in (("num_processes", n), ("process_id", pid), ("coordinator_address", address))
                   if v is None]
        if missing:
            raise ValueError(f"several processes need coordinator_address, num_processes and process_id "
                             f"(flags --coordinator_address/--num_processes/--process_id or ${ENV_COORDINATOR}/"
                             f"${ENV_NUM_PROCESSES}/${ENV_PROCESS_ID}); missing: {', '.join(missing)} "
                             f"(no SLURM, Open MPI or TPU slice detected to supply them)")
    return {"coordinator_address": address, "num_processes": n, "process_id": pid, "local_device_ids": ids}


def _enable_cpu_collectives() -> None:
    """Cross-process collectives on CPU need an implementation (the default was none before jax 0.5;
    gloo is the one JAX ships)."""
    import jax
    try:
        if jax.config.jax_cpu_collectives_implementation in (None, "", "none"):
            jax.config.update("jax_cpu_collectives_implementation", "gloo")
    except AttributeError:                                     # a jax without the option: nothing to set
        pass


def initialize(coordinator_address: Optional[str] = None, num_processes: Union[int, str, None] = None,
               process_id: Union[int, str, None] = None,
               local_device_ids: Union[str, int, Sequence[int], None] = None,
               initialization_timeout: Optional[int] = None) -> bool:
    """Join the job's processes (``jax.distributed.initialize``); True when there are several.

    A no-op (False) with one process, and when this process has already joined (True then if the job has
    several). Call it before anything uses JAX's devices. ``initialization_timeout``: seconds to wait for
    the other processes (default ``$DNGJAX_INIT_TIMEOUT`` or 300); when one never comes, JAX's runtime
    ends this process (jax 0.10 aborts it, exit code 134, rather than raising). See the module's
    documentation for where the settings come from.
    """
    global _initialized_here
    import jax

    if _initialized_here or _already_initialized():
        return jax.process_count() > 1
    kwargs = resolve(coordinator_address, num_processes, process_id, local_device_ids)
    if kwargs is None:
        return False
    timeout = _int(initialization_timeout if initialization_timeout is not None else env_timeout(), "timeout")
    _enable_cpu_collectives()
    try:
        jax.distributed.initialize(**kwargs, initialization_timeout=timeout or 300)
    except Exception as e:                  # the runtime started too late (or a jax that raises on a timeout)
        first = str(e).strip().splitlines()[0] if str(e).strip() else type(e).__name__
        if "before" in first or "already" in first:
            raise ValueError(f"the distributed runtime must start before JAX runs anything: {first}") from None
        raise ValueError(f"could not join the other processes (coordinator {kwargs['coordinator_address'] or 'from the cluster'}, "
                         f"{kwargs['num_processes'] or 'cluster-given'} processes, this one "
                         f"{kwargs['process_id'] if kwargs['process_id'] is not None else 'cluster-given'}): {first}; "
                         f"every process must run the same command with its own process id") from None
    _initialized_here = True
    return jax.process_count() > 1


def joined() -> bool:
    """True when this process has joined a job of several processes (starts no backend: safe to ask early)."""
    if not (_initialized_here or _already_initialized()):
        return False
    import jax
    return jax.process_count() > 1


def env_timeout() -> Optional[str]:
    return os.environ.get(ENV_TIMEOUT) or None


def _already_initialized() -> bool:
    import jax
    is_init = getattr(jax.distributed, "is_initialized", None)
    if is_init is not None:
        return bool(is_init())
    try:
        from jax._src import distributed as _d
        return _d.global_state.client is not None
    except (ImportError, AttributeError):
        return False


# --------------------------------------------------------------------------- helpers for the tools

def process_count() -> int:
    import jax
    return jax.process_count()


def is_main_process() -> bool:
    """True on process 0 (the one that writes logs, metrics, run folders and models), and with one process."""
    import jax
    return jax.process_index() == 0


def global_mesh(axis: str):
    """A 1-D mesh of every device of every process (``jax.devices()``), the axis named ``axis``."""
    import jax
    from jax.sharding import Mesh
    return Mesh(np.asarray(jax.devices()), (axis,))


def put_global(x, sharding):
    """The host array ``x`` (the same on every process: the whole global array) as a jax.Array laid out
    by ``sharding``; each process transfers only the pieces its own devices hold."""
    import jax
    if getattr(sharding, "is_fully_addressable", True):
        return jax.device_put(x, sharding)
    return jax.make_array_from_callback(x.shape, sharding, lambda idx: x[idx])


def to_host(tree):
    """A pytree of jax.Arrays as numpy arrays of their whole (global) values, on every process.
    Several processes: every process must call it (an all-gather)."""
    import jax
    leaves = jax.tree_util.tree_leaves(tree)
    if all(getattr(a, "is_fully_addressable", True) for a in leaves):
        return jax.tree_util.tree_map(np.asarray, tree)
    from jax.experimental import multihost_utils
    return multihost_utils.process_allgather(tree, tiled=True)


def barrier(name: str) -> None:
    """Wait until every process reaches the barrier ``name`` (nothing with one process)."""
    import jax
    if jax.process_count() > 1:
        from jax.experimental import multihost_utils
        multihost_utils.sync_global_devices(name)


def broadcast_from_main(value):
    """Process 0's value (a pytree of numbers / numpy arrays) on every process (itself with one process)."""
    import jax
    if jax.process_count() == 1:
        return value
    from jax.experimental import multihost_utils
    return multihost_utils.broadcast_one_to_all(value)


# --------------------------------------------------------------------------- command-line flags

def define_flags() -> None:
    """The absl flags of every tool: ``--coordinator_address``, ``--num_processes``, ``--process_id``,
    ``--local_device_ids`` (each falls back to its ``DNGJAX_*`` variable, then to a detected cluster)."""
    from absl import flags
    flags.DEFINE_string("coordinator_address", None,
                        f"Several processes: host:port of process 0 (default ${ENV_COORDINATOR}; "
                        "SLURM/Open MPI/TPU slices supply it).")
    flags.DEFINE_integer("num_processes", None,
                         f"Several processes: how many run this command (default ${ENV_NUM_PROCESSES}; 1: one).")
    flags.DEFINE_integer("process_id", None, f"Several processes: this one's id, 0..num_processes-1 "
                                             f"(default ${ENV_PROCESS_ID}).")
    flags.DEFINE_string("local_device_ids", None, f"Several processes: the local devices this process uses, "
                                                  f"e.g. 0,1 (default ${ENV_LOCAL_DEVICE_IDS}; all).")


def initialize_from_flags() -> bool:
    """:func:`initialize` from the flags of :func:`define_flags` (already parsed)."""
    from absl import flags
    F = flags.FLAGS
    return initialize(F.coordinator_address, F.num_processes, F.process_id, F.local_device_ids)
