"""Class removal's methods: method strings (``"DNG"``, ``"DNG:beta"``, ``"DNG[prior=0.1]"``), their rules and
grids of scales, and the removed classes of a config."""

from __future__ import annotations

from typing import Any, Dict, List, Tuple



METHODS = ("NP", "SLD", "DNG")


def removed_classes(config) -> Tuple[int, ...]:
    """The removed class, then config.also_remove's (several classes removed together)."""
    return (int(config.removed_class),) + tuple(int(c) for c in config.also_remove)


def class_tag(config) -> str:
    """"0", or "0+2" when several classes are removed together (paths' ``{c}``, titles)."""
    return "+".join(str(c) for c in removed_classes(config))


#: DNG method variants spelled the older way -> the update variance they set
VARIANT_VALUES = {"posterior": "beta_tilde"}


def parse_method(method: str) -> Tuple[str, str, Dict[str, float]]:
    """A method string -> (base, DNG update-variance variant, hyperparameter overrides).

    ``"DNG"`` -> ("DNG", "", {}); ``"DNG:beta"`` -> ("DNG", "beta", {}) (an update-variance variant: "beta",
    "beta_tilde", "step"; "DNG:posterior" is the older spelling of "DNG:beta_tilde", the label of archived runs);
    ``"DNG[prior=0.1,temperature=0.5]"`` -> ("DNG", "", {"prior": 0.1, "temperature": 0.5}): the method
    with those hyperparameters instead of config.dng's / config.sld's (hyperparameter studies run many
    settings in one job; same rule type, so one compilation serves them all).
    """
    head, bracket, rest = method.partition("[")
    overrides: Dict[str, float] = {}
    if bracket:
        if not rest.endswith("]") or not rest[:-1].strip():
            raise ValueError(f"method {method!r}: write overrides as NAME[key=value,...], e.g. DNG[prior=0.1]")
        for item in rest[:-1].split(","):
            key, eq, value = item.partition("=")
            try:
                overrides[key.strip()] = float(value)
            except ValueError:
                raise ValueError(f"method {method!r}: {item.strip()!r} is not key=number") from None
            if not eq or not key.strip():
                raise ValueError(f"method {method!r}: {item.strip()!r} is not key=number")
    base, _, variant = head.partition(":")
    if base not in METHODS:
        raise ValueError(f"unknown method {method!r}; choose among {METHODS} (DNG also as DNG:beta_tilde / DNG:beta, "
                         "any method with overrides as NAME[key=value,...])")
    if variant and base != "DNG":
        raise ValueError(f"only DNG has variants (DNG:beta_tilde, DNG:beta), got {method!r}")
    if overrides and base == "NP":
        raise ValueError(f"NP has no hyperparameter besides its scale (the grid), got {method!r}")
    if "scale" in overrides:
        raise ValueError(f"method {method!r}: the scale is swept by config.grid, not set per method")
    return base, variant, overrides


def method_key(method: str) -> str:
    """A file-name-safe name of a method string: ``DNG:beta`` -> ``DNG-beta``, ``DNG[prior=0.1]`` -> ``DNG-prior0.1``."""
    base, variant, overrides = parse_method(method)
    return "-".join([base] + ([variant] if variant else []) + [f"{k}{v:g}" for k, v in overrides.items()])


def build_rule(method: str, config):
    """(rule with scale 1, its other hyperparameters) for ``method`` ("NP", "SLD", "DNG", "DNG:beta",
    "DNG[prior=0.1]", ...). Unknown or illegal overrides raise ValueError naming them."""
    import dngjax as dj
    base, variant, overrides = parse_method(method)
    if base == "NP":
        return dj.NegativePrompting(scale=1.0), {}
    h = dict(config.sld) if base == "SLD" else dict(config.dng)
    unknown = sorted(set(overrides) - set(h))
    if unknown:
        raise ValueError(f"method {method!r}: {base} has no hyperparameter {unknown}; choose among {sorted(h)}")
    h.update(overrides)
    if variant:
        h["update_variance"] = VARIANT_VALUES.get(variant, variant)
    if base == "SLD":
        return dj.SafeLatentDiffusion(scale=1.0, **h), h
    k = len(removed_classes(config))
    if k > 1:                                         # several classes removed together: one concept each
        return dj.MultiConcept(dj.DynamicNegativeGuidance(scale=1.0, **h), num_concepts=k), h
    return dj.DynamicNegativeGuidance(scale=1.0, **h), h


def build_methods(config) -> List[Tuple[str, Any, Dict[str, Any], List[float]]]:
    """Every method's rule, hyperparameters and grid of scales, validated (illegal values raise).

    A method's grid is its own entry in ``config.method_grids`` ((method string, scales) pairs) if it
    has one, else its base's ``config.grid`` entry (``config.grid.DNG`` for every DNG variant)."""
    own = method_grids(config)
    out = []
    for m in config.methods:
        base, _, _ = parse_method(m)
        scales = [float(s) for s in own.get(m, config.grid[base])]
        if not scales:
            raise ValueError(f"config.method_grids of {m!r} is empty" if m in own else f"config.grid.{base} is empty")
        rule, hyper = build_rule(m, config)
        for s in scales:
            rule.replace(scale=s)                     # validates each grid value
        out.append((m, rule, hyper, scales))
    return out


def method_grids(config) -> Dict[str, Tuple[float, ...]]:
    """``config.method_grids`` as {method string: scales}, checked against ``config.methods`` (configs
    written before the field existed have none)."""
    pairs = config.get("method_grids", None) or ()
    own: Dict[str, Tuple[float, ...]] = {}
    for pair in pairs:
        if len(pair) != 2 or not isinstance(pair[0], str) or not isinstance(pair[1], (tuple, list)):
            raise ValueError(f"config.method_grids: write (method string, scales) pairs, got {pair!r}")
        m, scales = pair
        if m not in config.methods:
            raise ValueError(f"config.method_grids names {m!r}, which is not in config.methods {tuple(config.methods)}")
        if m in own:
            raise ValueError(f"config.method_grids gives {m!r} two grids")
        own[m] = tuple(float(s) for s in scales)
    return own
