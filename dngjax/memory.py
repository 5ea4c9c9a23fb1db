"""Does a compiled program fit in memory? XLA's estimate against the memory free, before the first run.

A batch far too large otherwise fails only when its first step runs out of memory (after the data
and the compilation). XLA reports, for a compiled program, the bytes of its arguments, outputs
(less those aliased to donated arguments) and temporaries
(``jax.jit(f).lower(...).compile().memory_analysis()``, on CPU and GPU alike); the free memory is
the device's limit less what it holds (GPU, TPU) or the host's ``MemAvailable`` within any cgroup
limit (CPU). :func:`check_fits` compares them and raises :class:`TooLarge` (a
:class:`dngjax.cli.UserError`: one line, exit code 2) naming the size to use instead.
"""

from __future__ import annotations

import os
from typing import Optional

from .cli import UserError


class TooLarge(UserError):
    """A program that would not fit in the memory available; the message names the size to use."""


def _read_int(path: str) -> Optional[int]:
    try:
        with open(path) as f:
            text = f.read().strip()
    except OSError:
        return None
    return int(text) if text.isdigit() else None


def host_available_bytes() -> Optional[int]:
    """Bytes of host memory a new allocation can take: ``MemAvailable`` (else free pages), within the
    cgroup's limit (v2 ``memory.max``, v1 ``memory.limit_in_bytes``) less its usage."""
    free = None
    try:
        with open("/proc/meminfo") as f:
            for line in f:
                if line.startswith("MemAvailable:"):
                    free = int(line.split()[1]) * 1024
                    break
    except (OSError, ValueError, IndexError):
        pass
    if free is None:
        try:
            free = os.sysconf("SC_AVPHYS_PAGES") * os.sysconf("SC_PAGE_SIZE")
        except (ValueError, OSError, AttributeError):
            return None
    for limit, usage in (("/sys/fs/cgroup/memory.max", "/sys/fs/cgroup/memory.current"),
                         ("/sys/fs/cgroup/memory/memory.limit_in_bytes",
                          "/sys/fs/cgroup/memory/memory.usage_in_bytes")):
        lim, use = _read_int(limit), _read_int(usage)
        if lim is not None and use is not None and lim < 1 << 60:
            free = min(free, max(lim - use, 0))
    return free


def available_bytes(device=None) -> Optional[int]:
    """Free bytes of ``device`` (default: the first local device); None when unknown."""
    import jax
    device = device or jax.local_devices()[0]
    if device.platform == "cpu":
        return host_available_bytes()
    try:
        stats = device.memory_stats() or {}
    except Exception:              # noqa: BLE001 -- a backend without memory statistics
        return None
    limit = stats.get("bytes_limit")
    return None if not limit else int(limit) - int(stats.get("bytes_in_use", 0))


def compiled_bytes(compiled) -> Optional[int]:
    """Bytes a run of the compiled program allocates beyond its (already resident) arguments:
    temporaries plus outputs not aliased to donated arguments; None when XLA does not say."""
    try:
        m = compiled.memory_analysis()
    except Exception:              # noqa: BLE001 -- not every backend implements it
        return None
    if m is None:
        return None
    if isinstance(m, (list, tuple)):
        m = m[0] if m else None
        if m is None:
            return None
    temp = int(getattr(m, "temp_size_in_bytes", 0) or 0)
    out = int(getattr(m, "output_size_in_bytes", 0) or 0) - int(getattr(m, "alias_size_in_bytes", 0) or 0)
    return temp + max(out, 0)


def gib(n: float) -> str:
    return f"{n / 2**30:.1f} GiB" if n >= 2**28 else f"{n / 2**20:.0f} MiB"


def suggest(size: int, need: float, free: float, fixed: float = 0.0, multiple: int = 1) -> int:
    """The largest power of two (a multiple of ``multiple`` when one fits) whose share of ``need`` fits in
    90 % of ``free``, ``need - fixed`` taken as proportional to ``size``; 0 when not even one fits."""
    per = max(need - fixed, 1.0) / max(size, 1)
    room = 0.9 * free - fixed
    if room < per:
        return 0
    s = 1 << (int(room // per).bit_length() - 1)
    if multiple > 1 and s >= multiple:
        s = s // multiple * multiple
    return min(s, size)


def check_fits(compiled, *, what: str, size_flag: str, size: int, extra_bytes: int = 0, fixed_bytes: int = 0,
               multiple: int = 1, hint: str = "", device=None) -> Optional[int]:
    """Raise :class:`TooLarge` when ``compiled`` (one ``what``, e.g. "one training step") plus
    ``extra_bytes`` (inputs not yet in memory) needs more than the memory free; returns the estimate
    (None: no estimate, nothing checked). The message names ``size_flag`` and a size to use instead
    (see :func:`suggest`; ``fixed_bytes``: the part of the need that does not grow with ``size``)."""
    need = compiled_bytes(compiled)
    free = available_bytes(device)
    if need is None or free is None:
        return need
    need += int(extra_bytes)
    if need <= free:
        return need
    import jax
    place = "host" if (device or jax.local_devices()[0]).platform == "cpu" else "device"
    s = suggest(size, need, free, fixed_bytes, multiple)
    way = (f"use {size_flag}={s} or less{hint}" if s else
           "even a size of 1 does not fit: a smaller network, or a machine with more memory")
    raise TooLarge(f"{size_flag}={size}: {what} needs ~{gib(need)} (estimated from XLA's compiled program) "
                   f"but {gib(free)} of {place} memory is free: {way}")


def check_sampling_chunk(denoiser, shape, n: int, chunk_size: int, grid: int = 1, trace_steps: int = 0,
                         size_flag: str = "--config.chunk_size", device=None) -> Optional[int]:
    """Raise :class:`TooLarge` when one chunk of a (guided) sampler would not fit: ``grid`` points of a
    sweep side by side (``dngjax.sweep``'s vmap) over ``min(chunk_size, n)`` seeds (split over the local
    devices), i.e. ``grid x chunk`` images through the network at once. The estimate: XLA's for one
    compiled pass of ``denoiser`` at that batch, plus the chain's per-image state (the sample, both
    predictions, the previous x_0 estimate, the step noise: ~8 copies of x) and ``trace_steps`` steps of
    the traces (lambda_t, p_t). Compiles the network pass once (a few seconds); returns the estimate."""
    import jax
    import jax.numpy as jnp
    import numpy as np
    ndev = jax.local_device_count()
    chunk = -(-min(int(chunk_size), int(n)) // ndev)           # seeds per device
    b = int(grid) * chunk
    pass_ = jax.jit(lambda d, x, t: d(x, t)).lower(
        denoiser, jax.ShapeDtypeStruct((b, *shape), jnp.float32), jax.ShapeDtypeStruct((b,), jnp.int32)).compile()
    state = b * (8 * 4 * int(np.prod(shape)) + 2 * 4 * int(trace_steps))
    return check_fits(pass_, what=f"one sampling chunk ({grid} grid point(s) x {chunk} seeds through the network "
                                  "at once, with the chain's state)",
                      size_flag=size_flag, size=int(chunk_size), extra_bytes=state, device=device)
