"""The project's tools as importable modules: training (:mod:`dngjax.tools.train`), the sampling jobs
(:mod:`dngjax.tools.sample`) and the Gaussian-mixture lab (:mod:`dngjax.tools.gmm_lab`).

Their command lines are ``python train/main.py``, ``python sample/main.py``, ``python -m train.export``
and ``python -m experiments.gmm`` in a checkout, and ``dngjax-train``, ``dngjax-sample``,
``dngjax-export`` and ``dngjax-gmm`` once installed; their configurations are
``dngjax/tools/{train,sample}/configs/`` (the checkout's ``train/configs/`` and ``sample/configs/``
name the same ones).
"""

import os

#: The folder above the ``dngjax`` package: a checkout's root when the package is used from one (an
#: editable install), else site-packages. Relative model paths (``checkpoints/mnist``) are also looked
#: up here, and its git commit is recorded with each run.
SOURCE_ROOT = os.path.dirname(os.path.dirname(os.path.dirname(os.path.abspath(__file__))))
