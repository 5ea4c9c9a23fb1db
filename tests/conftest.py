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


import numpy as np  # noqa: E402
import pytest  # noqa: E402


@pytest.fixture(scope="module")
def train_data(tmp_path_factory):
    """A folder with a small MNIST-like mnist.npz for the training command-line runs (300 train, the first
    50 as test images; class = position of a bright square, as in tests/test_train.py)."""
    d = tmp_path_factory.mktemp("data")
    rng = np.random.default_rng(0)
    y = (np.arange(300) % 10).astype(np.uint8)
    x = rng.integers(0, 40, (300, 28, 28), dtype=np.uint8)
    for i, c in enumerate(y):
        r, q = divmod(int(c), 5)
        x[i, 4 + 10 * r:12 + 10 * r, 2 + 5 * q:7 + 5 * q] = 250
    np.savez(d / "mnist.npz", x_train=x, y_train=y, x_test=x[:50], y_test=y[:50])
    return str(d)
