"""Settings for the whole test run.

The suite's tiny models spend most of their time in XLA:CPU's compiler, not in running: compiling
a ch-8 UNet's ``init`` takes ~12 s at the default backend optimisation level and ~6 s at level 0,
while the programs then run in milliseconds. Level 0 skips LLVM's optimisation passes only (the
same HLO, the same float semantics), so the suite runs at level 0 unless XLA_FLAGS already sets a
level (measured: tests/test_unet.py + tests/test_train.py 351 s -> 179 s). Set before JAX's backend
starts, in every pytest-xdist worker and every subprocess a test launches (they inherit the
environment).
"""

import os

_flags = os.environ.get("XLA_FLAGS", "")
if "xla_backend_optimization_level" not in _flags:
    os.environ["XLA_FLAGS"] = (_flags + " --xla_backend_optimization_level=0").strip()
