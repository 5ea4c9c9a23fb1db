"""A PyTorch (CPU) twin of :class:`dngjax.models.unet.UNet` and a Python-loop DNG sampler.

Used by ``bench/sampler.py`` as the baseline "in the style of the authors' code":
an NCHW ``torch.nn`` UNet, layer for layer the Flax one (GroupNorm eps 1e-6,
swish, 3x3 convs with padding 1, the timestep embedding projected by a Dense on
swish(temb), single-head attention), built from and loaded with the Flax params
(conv kernels HWIO -> OIHW, Dense (in, out) -> Linear (out, in)), and a sampler
that is a plain ``for t in reversed(range(T))`` loop with two network calls per
step under ``torch.no_grad()`` followed by the DNG posterior update.

Not part of the library: it exists only to be measured against.
"""

from __future__ import annotations

import math
from typing import Any, Mapping

import numpy as np
import torch
import torch.nn as nn
import torch.nn.functional as F


def _t(a, dtype=torch.float32) -> torch.Tensor:
    return torch.from_numpy(np.array(a, dtype=np.float32, copy=True)).to(dtype)


def _conv(p: Mapping[str, Any], stride: int = 1, padding: int = 1) -> nn.Conv2d:
    k = np.asarray(p["kernel"])                               # (kh, kw, in, out)
    kh, kw, cin, cout = k.shape
    conv = nn.Conv2d(cin, cout, (kh, kw), stride=stride, padding=padding if kh > 1 else 0)
    with torch.no_grad():
        conv.weight.copy_(_t(k.transpose(3, 2, 0, 1)))       # -> (out, in, kh, kw)
        conv.bias.copy_(_t(p["bias"]))
    return conv


def _linear(p: Mapping[str, Any]) -> nn.Linear:
    k = np.asarray(p["kernel"])                               # (in, out)
    lin = nn.Linear(k.shape[0], k.shape[1])
    with torch.no_grad():
        lin.weight.copy_(_t(k.T))
        lin.bias.copy_(_t(p["bias"]))
    return lin


def _norm(p: Mapping[str, Any], groups: int) -> nn.GroupNorm:
    c = np.asarray(p["scale"]).shape[0]
    gn = nn.GroupNorm(groups, c, eps=1e-6)
    with torch.no_grad():
        gn.weight.copy_(_t(p["scale"]))
        gn.bias.copy_(_t(p["bias"]))
    return gn


def timestep_embedding(t: torch.Tensor, dim: int) -> torch.Tensor:
    half = dim // 2
    freqs = torch.exp(-math.log(10000.0) * torch.arange(half, dtype=torch.float32) / (half - 1))
    args = t.float()[:, None] * freqs[None, :]
    emb = torch.cat([torch.sin(args), torch.cos(args)], dim=-1)
    if dim % 2:
        emb = F.pad(emb, (0, 1))
    return emb


class ResBlock(nn.Module):
    def __init__(self, p, groups):
        super().__init__()
        self.norm1 = _norm(p["norm1"], groups)
        self.conv1 = _conv(p["conv1"])
        self.temb_proj = _linear(p["temb_proj"])
        self.norm2 = _norm(p["norm2"], groups)
        self.conv2 = _conv(p["conv2"])
        self.shortcut = _conv(p["shortcut"], padding=0) if "shortcut" in p else None

    def forward(self, x, temb):
        h = self.conv1(F.silu(self.norm1(x)))
        h = h + self.temb_proj(F.silu(temb))[:, :, None, None]
        h = self.conv2(F.silu(self.norm2(h)))              # dropout: eval mode
        if self.shortcut is not None:
            x = self.shortcut(x)
        return x + h


class AttnBlock(nn.Module):
    def __init__(self, p, groups):
        super().__init__()
        self.norm = _norm(p["norm"], groups)
        self.q, self.k, self.v = _linear(p["q"]), _linear(p["k"]), _linear(p["v"])
        self.proj_out = _linear(p["proj_out"])

    def forward(self, x):
        b, c, hgt, wid = x.shape
        h = self.norm(x).reshape(b, c, hgt * wid).transpose(1, 2)      # (b, hw, c)
        q, k, v = self.q(h), self.k(h), self.v(h)
        w = torch.softmax(torch.bmm(q, k.transpose(1, 2)) * (c ** -0.5), dim=-1)
        h = self.proj_out(torch.bmm(w, v))
        return x + h.transpose(1, 2).reshape(b, c, hgt, wid)


class TorchUNet(nn.Module):
    """The Flax UNet's forward pass in NCHW torch, built from (and holding a copy of) its params.

    ``TorchUNet(flax_module, flax_params)``; ``forward(x (B,C,H,W), t (B,) long) -> (B,C,H,W)``.
    Unconditional models only (the benchmark needs no labels).
    """

    def __init__(self, module, params: Mapping[str, Any]):
        super().__init__()
        p = params["params"] if "params" in params else params
        if module.num_classes:
            raise NotImplementedError("TorchUNet mirrors unconditional UNets only")
        g = module.groups
        self.ch = module.ch
        self.ch_mult = tuple(module.ch_mult)
        self.num_res_blocks = module.num_res_blocks
        self.attn_resolutions = tuple(module.attn_resolutions)
        if module.downsample_padding != 1:
            raise NotImplementedError("TorchUNet mirrors downsample_padding=1 only")
        self.temb_dense0 = _linear(p["temb_dense0"])
        self.temb_dense1 = _linear(p["temb_dense1"])
        self.conv_in = _conv(p["conv_in"])
        self.blocks = nn.ModuleDict()
        for name, sub in p.items():
            if "_res_" in name:
                self.blocks[name] = ResBlock(sub, g)
            elif "attn" in name:
                self.blocks[name] = AttnBlock(sub, g)
            elif name.endswith("downsample"):
                self.blocks[name] = _conv(sub, stride=2)
            elif name.endswith("upsample"):
                self.blocks[name] = _conv(sub)
        self.norm_out = _norm(p["norm_out"], g)
        self.conv_out = _conv(p["conv_out"])

    def forward(self, x, t):
        temb = timestep_embedding(t, self.ch)
        temb = self.temb_dense1(F.silu(self.temb_dense0(temb)))
        b = self.blocks
        h = self.conv_in(x)
        skips = [h]
        n_levels = len(self.ch_mult)
        for level in range(n_levels):
            for i in range(self.num_res_blocks):
                h = b[f"down_{level}_res_{i}"](h, temb)
                if h.shape[2] in self.attn_resolutions:
                    h = b[f"down_{level}_attn_{i}"](h)
                skips.append(h)
            if level != n_levels - 1:
                h = b[f"down_{level}_downsample"](h)
                skips.append(h)
        h = b["mid_res_0"](h, temb)
        h = b["mid_attn"](h)
        h = b["mid_res_1"](h, temb)
        for level in reversed(range(n_levels)):
            for i in range(self.num_res_blocks + 1):
                h = torch.cat([h, skips.pop()], dim=1)
                h = b[f"up_{level}_res_{i}"](h, temb)
                if h.shape[2] in self.attn_resolutions:
                    h = b[f"up_{level}_attn_{i}"](h)
            if level != 0:
                h = F.interpolate(h, scale_factor=2, mode="nearest")
                h = b[f"up_{level}_upsample"](h)
        h = F.silu(self.norm_out(h))
        return self.conv_out(h)


@torch.no_grad()
def dng_sample(model_u, model_neg, schedule, n: int, shape=(1, 28, 28), *, scale=1.0, prior=0.25,
               temperature=0.25, offset=0.0, p_min=1e-6, p_max=0.99, generator=None,
               rule: str = "dng"):
    """DNG (or NP with ``rule="np"``) ancestral DDPM sampling as a Python loop, authors' style.

    ``schedule``: a :class:`dngjax.Schedule` (its arrays are read once as numpy).
    Same update as :class:`dngjax.DynamicNegativeGuidance` with ``update_variance="beta_tilde"``.
    Returns x_0 of shape (n, *shape) (NCHW).
    """
    timesteps = np.asarray(schedule.timesteps)
    betas = np.asarray(schedule.betas, np.float64)
    alpha_bars = np.asarray(schedule.alpha_bars, np.float64)
    beta_tilde = np.asarray(schedule.beta_tildes, np.float64)
    x = torch.randn((n, *shape), generator=generator)
    log_p = torch.full((n,), math.log(prior))
    for i in reversed(range(len(timesteps))):
        t = torch.full((n,), int(timesteps[i]), dtype=torch.long)
        eps_u = model_u(x, t)
        eps_neg = model_neg(x, t)
        if rule == "np":
            lam = torch.full((n,), float(scale))
        else:
            p = torch.exp(log_p)
            lam = scale * p / (1.0 - p)
        eps = eps_u - lam[:, None, None, None] * (eps_neg - eps_u)
        beta, ab = betas[i], alpha_bars[i]
        coef, inv_sqrt_alpha = beta / math.sqrt(1.0 - ab), 1.0 / math.sqrt(1.0 - beta)
        mean = (x - coef * eps) * inv_sqrt_alpha
        if i > 0:
            x_next = mean + math.sqrt(beta) * torch.randn(x.shape, generator=generator)
        else:
            x_next = mean
        if rule != "np":
            mu_u = (x - coef * eps_u) * inv_sqrt_alpha
            mu_neg = (x - coef * eps_neg) * inv_sqrt_alpha
            sq_neg = (x_next - mu_neg).square().sum(dim=(1, 2, 3))
            sq_u = (x_next - mu_u).square().sum(dim=(1, 2, 3))
            sigma2 = beta if i == 0 else beta_tilde[i]
            log_p = log_p + (-temperature * (sq_neg - sq_u) + offset) / (2.0 * sigma2)
            log_p = log_p.clamp(math.log(p_min), math.log(p_max))
        x = x_next
    return x
