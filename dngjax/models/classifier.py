"""Small CNN classifier that scores samples and supplies features for the Fréchet distance.

``module.apply(params, x)`` -> logits (B, num_classes);
``module.apply(params, x, method="features")`` -> penultimate-layer features (B, feature_dim).
Inputs are NHWC float in [-1, 1] (model space of the DDPMs).
"""

from __future__ import annotations

from typing import Sequence

import jax.numpy as jnp
import flax.linen as nn

Array = jnp.ndarray


class Classifier(nn.Module):
    """Two conv stages (two 3x3 convs + 2x2 max-pool each), a dense feature layer, a linear head."""

    num_classes: int = 10
    widths: Sequence[int] = (32, 64)
    feature_dim: int = 128
    dropout: float = 0.3

    def setup(self):
        convs = []
        for i, w in enumerate(self.widths):
            convs.append((nn.Conv(w, (3, 3), padding="SAME", name=f"conv{i}_0"),
                          nn.Conv(w, (3, 3), padding="SAME", name=f"conv{i}_1")))
        self.convs = convs
        self.fc = nn.Dense(self.feature_dim, name="fc")
        self.drop = nn.Dropout(self.dropout)
        self.head = nn.Dense(self.num_classes, name="head")

    def features(self, x: Array, train: bool = False) -> Array:
        if x.ndim != 4:
            raise ValueError(f"Classifier expects NHWC input of rank 4, got shape {x.shape}")
        h = x.astype(jnp.float32)
        for c0, c1 in self.convs:
            h = nn.relu(c0(h))
            h = nn.relu(c1(h))
            h = nn.max_pool(h, (2, 2), strides=(2, 2))
        h = h.reshape(h.shape[0], -1)
        return nn.relu(self.fc(h))

    def __call__(self, x: Array, train: bool = False) -> Array:
        h = self.features(x, train)
        h = self.drop(h, deterministic=not train)
        return self.head(h)
