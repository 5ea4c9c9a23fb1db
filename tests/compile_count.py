"""Count XLA backend compilations of jitted functions (via jax.monitoring), for compile-once tests."""

import contextlib
from typing import Iterator, List

from jax import monitoring
from jax._src import dispatch


@contextlib.contextmanager
def count_compiles(fun_name_part: str) -> Iterator[List[str]]:
    """Yields a list that collects the name of every backend compilation whose function name contains
    ``fun_name_part`` (e.g. "train_step", "_grid_impl") while the block runs."""
    compiles: List[str] = []

    def listener(event, duration, **kw):
        if event == dispatch.BACKEND_COMPILE_EVENT and fun_name_part in str(kw.get("fun_name", "")):
            compiles.append(kw["fun_name"])

    monitoring.register_event_duration_secs_listener(listener)
    try:
        yield compiles
    finally:
        monitoring.unregister_event_duration_listener(listener)
