"""A plain numpy DDPM + guidance loop written from the paper's Alg. 1-2, as an independent oracle.

Only the Gaussian noise comes from jax.random (the same per-sample key scheme the
sampler documents: split the key once for x_T, then split at every step), so the
trajectories can be compared draw for draw. Everything else is float64 numpy.
"""

import numpy as np
import jax


def noise_sequence(key, shape, num_steps):
    """x_T and the per-step noise z of one sample, as the sampler draws them."""
    k_init, k = jax.random.split(key)
    x_T = np.asarray(jax.random.normal(k_init, shape), np.float64)
    zs = []
    for _ in range(num_steps):
        k, k_noise = jax.random.split(k)
        zs.append(np.asarray(jax.random.normal(k_noise, shape), np.float64))
    return x_T, zs


def sample_numpy(eps_u, eps_c, schedule, keys, shape, method, hp):
    """Guided ancestral DDPM sampling, one sample at a time, in float64.

    method: 'none', 'np', 'cfg', 'sld', 'dng'. hp: dict of hyperparameters; hp['noise'] is the
    sampler's step variance ('beta', default, or 'beta_tilde'); hp['update_variance'] DNG's; hp['eta'] (if given)
    replaces the ancestral step by DDIM's (Song et al. 2021, eq. 12), written as in the paper:
    x' = sqrt(ab') x0_hat + sqrt(1 - ab' - sigma^2) eps + sigma z, sigma^2 = eta^2 (1 - ab')/(1 - ab) (1 - ab/ab').
    Returns x0 (B, *shape), lam (S, B), p (S, B) in sampling order.
    """
    betas = np.asarray(schedule.betas, np.float64)
    abar = np.asarray(schedule.alpha_bars, np.float64)
    abar_prev = np.asarray(schedule.alpha_bars_prev, np.float64)
    ts = np.asarray(schedule.timesteps)
    S = len(betas)
    outs, lams, ps = [], [], []
    for key in keys:
        x, zs = noise_sequence(key, shape, S)
        log_p = np.log(hp.get("prior", 0.5))
        m = np.zeros(shape)
        lam_row, p_row = [], []
        for n, i in enumerate(reversed(range(S))):
            beta, ab = betas[i], abar[i]
            t = ts[i]
            e_u = eps_u(x, t)
            e_c = eps_c(x, t)
            p = np.nan
            if method == "none":
                eps, lam = e_u, 0.0
            elif method == "np":
                lam = hp["scale"]
                eps = e_u - lam * (e_c - e_u)
            elif method == "cfg":
                lam = hp["scale"]
                eps = e_u + lam * (e_c - e_u)
            elif method == "sld":
                d = e_u - e_c
                mask = np.where(d < hp["threshold"], np.minimum(1.0, hp["s_s"] * np.abs(d)), 0.0)
                corr = -mask * d + hp["s_m"] * m
                m = hp["beta_m"] * m + (1 - hp["beta_m"]) * corr
                scale = hp["scale"] if n >= hp.get("warmup", 0) else 0.0
                eps = e_u - scale * corr
                lam = scale * mask.mean()
            elif method == "dng":
                p = np.exp(log_p)
                lam = hp["scale"] * p / (1 - p)
                eps = e_u - lam * (e_c - e_u)
            beta_tilde = beta * (1 - abar_prev[i]) / (1 - ab)
            if "eta" in hp:
                abp = abar_prev[i]
                noise_var = hp["eta"] ** 2 * (1 - abp) / (1 - ab) * (1 - ab / abp)

                def mean(e):
                    x0 = (x - np.sqrt(1 - ab) * e) / np.sqrt(ab)
                    return np.sqrt(abp) * x0 + np.sqrt(max(1 - abp - noise_var, 0.0)) * e
            else:
                mean = lambda e: (x - beta / np.sqrt(1 - ab) * e) / np.sqrt(1 - beta)
                noise_var = beta if hp.get("noise", "beta") == "beta" else beta_tilde
            x_next = mean(eps) + (0.0 if i == 0 else np.sqrt(noise_var) * zs[n])
            if method == "dng":
                variance = hp.get("update_variance", "beta_tilde")
                if variance == "beta" or i == 0:
                    sigma2 = beta
                elif variance == "step":
                    sigma2 = noise_var
                else:
                    sigma2 = beta_tilde
                d_neg = np.sum((x_next - mean(e_c)) ** 2)
                d_u = np.sum((x_next - mean(e_u)) ** 2)
                log_p += (-hp["temperature"] * (d_neg - d_u) + hp.get("offset", 0.0)) / (2 * sigma2)
                log_p = np.clip(log_p, np.log(hp.get("p_min", 1e-6)), np.log(hp.get("p_max", 0.99)))
            lam_row.append(lam)
            p_row.append(p)
            x = x_next
        outs.append(x)
        lams.append(lam_row)
        ps.append(p_row)
    return np.stack(outs), np.asarray(lams).T, np.asarray(ps).T
