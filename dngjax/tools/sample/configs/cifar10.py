"""CIFAR-10 class removal (a GPU job), scored with FID proper.

``python sample/main.py --config=sample/configs/cifar10.py[:full] --config.fid_weights=PATH``
where PATH is pytorch-fid's ``pt_inception-2015-12-05-6726825d.pth`` (download it from
https://github.com/mseitzer/pytorch-fid/releases/download/fid_weights/pt_inception-2015-12-05-6726825d.pth).
Needs checkpoints/cifar10/{ddpm,forget_C,classifier} (not shipped; ``ddpm`` may be Ho et
al.'s model converted with ``python -m dngjax.models.convert_diffusers``, see docs/cifar10.md,
and ``forget_C`` a model fine-tuned on class C only, in either format). The reference
Inception statistics of the training set without the removed class are computed
from the data set on the first run (``compute_reference``) and cached.

The paper's CIFAR-10 hyperparameters: DNG prior 0.01, temperature 0.2, offset 2e-4
(the authors' example also uses p_max 0.8); SLD as for MNIST.
"""

from dngjax.tools.sample.configs.common import base_config


def get_config(name: str = "quick"):
    c = base_config()
    c.name = name
    c.dataset = "cifar10"
    c.checkpoints = "checkpoints/cifar10"
    c.features = "inception"
    c.reference_stats = "{root}/reference_stats/inception_train_without_{c}.npz"
    c.compute_reference = True
    c.dng.prior = 0.01
    c.dng.temperature = 0.2
    c.dng.offset = 2e-4
    c.dng.p_max = 0.8
    c.grid.NP = (0.25, 0.5, 1.0, 2.0)
    c.grid.SLD = (0.25, 0.5, 1.0, 2.0)
    c.grid.DNG = (1.0, 2.0, 5.0, 10.0)
    c.eval_batch = 200
    c.bootstrap = 0        # FD bootstrap on 2048-d features costs seconds per resample
    if name == "quick":
        c.n = 1024
        c.steps = 100
        c.chunk_size = 256
    elif name == "full":
        c.n = 10240
        c.steps = 1000
        c.chunk_size = 512
        c.grid.NP = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0)
        c.grid.SLD = (0.1, 0.25, 0.5, 1.0, 2.0, 4.0)
        c.grid.DNG = (1.0, 2.0, 5.0, 10.0, 20.0, 50.0)
    else:
        raise ValueError(f"unknown config {name!r}: quick or full")
    return c
