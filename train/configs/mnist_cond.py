"""MNIST class-conditional DDPM: one network for eps(x | c), c = 0..9, and eps(x) (the null label 10).

``--config=train/configs/mnist_cond.py:cpu``. The architecture and schedule of
``mnist_ddpm.py`` (same size) plus a label embedding added to the timestep embedding;
during training each label is replaced by the null label with probability
``label_dropout`` (classifier-free guidance training, Ho & Salimans 2022), so any class
can be removed with ``eps_u = eps(x | null)`` and ``eps_neg = eps(x | c-)`` from one model.
"""

from train.configs import mnist_ddpm


def get_config(size: str = "cpu"):
    c = mnist_ddpm.get_config(size)
    c.name = "mnist_cond"
    c.model.kwargs.num_classes = 10
    c.label_dropout = 0.1
    return c
