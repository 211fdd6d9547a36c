"""Risk-committee calibration: the lowest maintenance margin that meets a loss target.

"Which maintenance-margin level keeps the probability of exhausting the insurance fund below
0.1% at the lowest margin?" Margin changes losses only through *when* accounts are closed
out: on a one-step scenario an account's bad debt is ``max(0, -equity)`` whatever its margin,
so calibration needs paths (Monte Carlo steps or replay windows), where a higher margin is
breached earlier and closes the account out before its equity runs out
(``liquidation.path_outcome``). Every target is taken over the paths (the random
scenarios), ``worst_bad_debt`` included: one-off shocks in the same file are not moved by
margin.

What is scaled (``--vary``, comma-separated; ``parse_vary``) is what the snapshot's margin
model's maintenance margin is made of. Standard model: ``mm_rate`` scales every
maintenance-margin rate (risk-limit tier rates with them), ``mm_rate.<UNDERLYING>`` (e.g.
``mm_rate.BTC``) those of the instruments on that underlying (futures, perpetuals and options
alike). Portfolio model: ``mm_factor`` (MM as a share of IM), and the risk matrix's shock
sizes, each whole (every underlying's) or per underlying: ``price_range`` (the price move),
``volatility_range_up`` and ``volatility_range_down`` (the relative vol shocks at 30 days to
expiry), ``max_delta_shock`` (the rate on net delta past its threshold),
``annualised_move_risk`` and ``min_annualised_move`` (the roll shock and its floor), e.g.
``volatility_range_up.BTC``. Var model: ``mm_factor``. Scales stay within what
``[margin]`` accepts (``mm_factor <= 1``, ``price_range <= 0.99``), and the portfolio and var
models' result is given as the ``[margin]`` keys to set.

One lever is searched exactly: the smallest scale ``m`` on a grid of ``tolerance`` whose exact
run meets the target is found by bisection. Bisection assumes the metric does not rise with
margin, which holds path by path when a higher margin only brings close-outs earlier; the
result is re-checked exactly, and the level one step below is reported as failing, so a
non-monotone case shows. Several (``mm_rate.BTC,mm_rate.ETH``) are a vector ``theta`` of
scales, searched in two stages:

1. **Smooth relaxation, gradient descent.** ``smooth_metric`` is the target metric with every
   step of a path revalued (``sensitivities.account_states``, one ``jax.checkpoint``-ed step
   of a ``lax.scan`` at a time, so reverse mode keeps one step's ``[accounts, scenarios]``
   arrays, not all of them) and the first breach made soft: an account breaches step ``k``
   with weight ``sigmoid((MM - collateral) / (BREACH_SOFTNESS * MM_now))`` (``MM_now`` its
   maintenance margin at the snapshot, current rates), survives it with the complement, and
   its equity is the survival-weighted mix of the step equities. The fund's depletion is
   ``sigmoid((bad debt - fund) / tau)`` (``tau`` as ``sensitivities``: 1% of the fund now), the
   largest bad debt a ``tau``-log-sum-exp; quantiles and ES sort (differentiably). The
   relaxation ignores liquidation fees, price impact, the oracle lag and partial close-outs;
   the exact stage does not. Adam on ``log theta`` minimises total maintenance margin at the
   snapshot (relative to now) plus an augmented-Lagrangian term
   ``lam * h + rho / 2 * max(0, h)^2`` of the relative excess ``h = (metric - limit) /
   max(limit, tau)`` (``ROUNDS`` rounds of ``STEPS`` steps, ``lam`` updated and ``rho``
   doubled between rounds).
2. **Exact check and scale along the ray.** The smooth solution ``theta*`` is run exactly
   (``engine.run``); whatever the verdict, the smallest ``s`` on the ``tolerance`` grid with
   the target met at ``s * theta*`` is found by exact bisection, up when ``theta*`` misses the
   target, down when it meets it with room to spare. So the result meets the target in the
   engine and the level one grid step lower along the same ray does not. Where no scale along
   the ray meets it (the relaxation stopped with a scale at its top and under-estimated the
   metric there), the ray to every lever's top is searched instead (``fallback``; every lever
   alike where the tops are ``hi``): its end has the most margin of any point.
"""

from __future__ import annotations

import dataclasses
import functools
import math
import re
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import margin
from . import sensitivities as sens
from .errors import InputError
from .snapshot import FUTURE, OPTION, PERPETUAL

METRICS = ("p_fund_depleted", "worst_bad_debt", "bad_debt_mean", "bad_debt_q99", "bad_debt_es99")
BREACH_SOFTNESS = 0.2  # soft first breach: sigmoid width, of the account's maintenance margin now
STEPS, ROUNDS = 60, 6  # Adam steps per augmented-Lagrangian round, rounds
LEARNING_RATE = 0.05  # Adam, on log theta


@dataclasses.dataclass(frozen=True)
class Target:
    metric: str
    limit: float

    def met(self, value: float) -> bool:
        return value <= self.limit


def parse_target(text: str) -> Target:
    """``"p_fund_depleted<=0.001"`` -> ``Target``; anything else is a usage error."""
    m = re.fullmatch(r"\s*([a-z_0-9]+)\s*<=\s*([0-9.eE+-]+)\s*", text or "")
    if not m or m.group(1) not in METRICS:
        raise InputError("--target", None, None, f"{text!r}: expected METRIC<=VALUE with METRIC one of {', '.join(METRICS)}")
    try:
        limit = float(m.group(2))
    except ValueError:
        raise InputError("--target", None, None, f"{m.group(2)!r} is not a number") from None
    if not math.isfinite(limit) or limit < 0:
        raise InputError("--target", None, None, f"{limit!r} must be a finite number >= 0")
    if m.group(1).startswith("p_") and limit > 1:  # as a limit of stress run: a probability is at most 1
        raise InputError("--target", None, None, f"{limit!r}: a probability limit is at most 1")
    return Target(m.group(1), limit)


@dataclasses.dataclass(frozen=True)
class Lever:
    """One scale ``--vary`` names: which ``Params`` field it multiplies, and where."""

    name: str  # as named on the command line, e.g. "price_range.BTC"
    field: str  # the Params field it multiplies: "mm_rate", "pm_mm_factor" or a TABLES field
    mask: np.ndarray  # [I] instruments (mm_rate), [A] assets (TABLES fields) or [1] (pm_mm_factor), bool
    top: float  # the largest scale [margin] accepts: 1 / mm_factor, 0.99 / the largest price range; inf


# The portfolio model's per-underlying shock sizes that can be levers: [margin] key -> Params
# field. Each is a table in [margin] ({BTC = 0.16, ETH = 0.2}), whole or per underlying, and
# the margin rises with each: the price move, the vol shocks, the delta shock's rate on net
# delta past its threshold, and the roll shock's annualised move and its floor.
TABLES = {"price_range": "pm_price_range", "volatility_range_up": "pm_vol_up",
          "volatility_range_down": "pm_vol_down", "max_delta_shock": "pm_max_delta_shock",
          "annualised_move_risk": "pm_move_risk", "min_annualised_move": "pm_min_move"}
# The instruments a TABLES key moves the margin of, where not every kind: key -> (kinds, what
# they are, why); a lever on an underlying none of them is on changes nothing, and is refused
NEEDS = {"volatility_range_up": ((OPTION,), "option", "a vol shock moves options' margin only"),
         "volatility_range_down": ((OPTION,), "option", "a vol shock moves options' margin only"),
         "annualised_move_risk": ((FUTURE,), "dated future", "the roll shock's annualised move is a dated future's"),
         "min_annualised_move": ((FUTURE, PERPETUAL), "future or perpetual",
                                 "the roll shock is a future's or a perpetual's")}
# What each margin model's maintenance margin is made of, as ``--vary`` names it
LEVERS = {"standard": ("mm_rate",), "portfolio": ("mm_factor", *TABLES), "var": ("mm_factor",)}


def _limit(key: str) -> float:
    """The largest value ``[margin]`` accepts for a ``TABLES`` key (0.99 for price_range)."""
    return margin._PER_ASSET[key][2]


def default_vary(snap: Any) -> str:
    """The one scale on the snapshot's margin model's whole maintenance margin: ``mm_rate``
    (standard) or ``mm_factor`` (portfolio, var)."""
    return LEVERS[snap.margin_config.get("model", "standard")][0]


def parse_vary(text: str, snap: Any) -> tuple[Lever, ...]:
    """``--vary``: one lever or several, comma-separated (a vector).

    Under the standard model ``mm_rate`` (every maintenance-margin rate, tier rates included)
    and ``mm_rate.<UNDERLYING>`` (those of the instruments on that underlying); under the
    portfolio model ``mm_factor`` and each ``TABLES`` key, whole or ``.<UNDERLYING>``
    (``price_range``, ``volatility_range_up.BTC``); under the var model ``mm_factor``. A lever the snapshot's model does not use would change nothing,
    so it is refused.

    Raises:
      InputError (``--vary``): an unknown form, a lever of another margin model, an underlying
        no instrument has, a repeat, overlapping levers (``mm_rate`` with ``mm_rate.BTC``), a
        lever on an underlying with none of the instruments it moves (``NEEDS``: a vol shock
        where no option is, a roll shock where no future is), or a lever whose current value
        is 0 (no scale moves it).
    """
    model = snap.margin_config.get("model", "standard")
    allowed = LEVERS[model]
    forms = ", ".join(f"{k} or {k}.<UNDERLYING>" if k != "mm_factor" else k for k in allowed)
    names = tuple(p.strip() for p in (text or "").split(","))
    under = np.asarray(snap.instruments.underlying)
    p = snap.params
    levers = []
    for name in names:
        m = re.fullmatch(rf"(mm_rate|mm_factor|{'|'.join(TABLES)})(?:\.(.+))?", name)
        if not m:
            raise InputError("--vary", None, None, f"{name!r}: expected {forms} (the {model} margin model's), "
                             "several comma-separated")
        family, asset = m.groups()
        if family not in allowed:
            raise InputError("--vary", None, None, f"{name!r}: the {model} margin model's maintenance margin does not "
                             f"use {family}; vary {forms}")
        if family == "mm_factor":
            if asset is not None:
                raise InputError("--vary", None, None, f"{name!r}: mm_factor is one number for every underlying; "
                                 "vary mm_factor")
            levers.append(Lever(name, "pm_mm_factor", np.ones(1, bool), _top(1.0, float(p.pm_mm_factor), name)))
            continue
        if asset is not None and (asset not in snap.assets or not (under == snap.asset_index(asset)).any()):
            known = ", ".join(sorted({snap.assets[i] for i in np.unique(under)}))
            raise InputError("--vary", None, None, f"{name!r}: no instrument has the underlying {asset!r} "
                             f"(underlyings: {known})")
        if family == "mm_rate":
            mask = np.ones(len(under), bool) if asset is None else under == snap.asset_index(asset)
            levers.append(Lever(name, "mm_rate", mask, math.inf))
        else:  # a TABLES key: per asset as underlying; the whole key moves every underlying's
            mask = np.isin(np.arange(len(snap.assets)), under) if asset is None else \
                np.arange(len(snap.assets)) == snap.asset_index(asset)
            field = TABLES[family]
            if family in NEEDS:
                kinds, what, why = NEEDS[family]
                if not np.isin(under[np.isin(np.asarray(snap.instruments.kind), kinds)], np.flatnonzero(mask)).any():
                    raise InputError("--vary", None, None, f"{name!r}: no {what} is on {asset or 'any underlying'}, "
                                     f"and {why}")
            current = float(np.max(np.asarray(getattr(p, field))[mask]))
            levers.append(Lever(name, field, mask, _top(_limit(family), current, name)))
    if len(set(names)) < len(names):
        raise InputError("--vary", None, None, f"{text!r}: a parameter is named twice")
    for field in {lv.field for lv in levers}:
        if sum(lv.mask.astype(int) for lv in levers if lv.field == field).max() > 1:
            whole = {"mm_rate": "mm_rate", **{f: k for k, f in TABLES.items()}}[field]
            raise InputError("--vary", None, None, f"{text!r}: {whole} scales every underlying's; combine it with "
                             f"no {whole}.<UNDERLYING>")
    return tuple(levers)


def _top(limit: float, current: float, name: str) -> float:
    """The largest scale of ``current`` that ``[margin]`` accepts (``limit`` its upper bound)."""
    if current <= 0.0:
        raise InputError("--vary", None, None, f"{name!r} is 0 today: no scale of it changes the margin")
    return limit / current


def multipliers(theta: Any, levers: tuple[Lever, ...], xp: Any = np) -> dict[str, Any]:
    """Each varied ``Params`` field's multiplier: ``theta [G]`` on each lever's mask, 1
    elsewhere; ``[I]``, ``[A]`` or ``[1]`` per field."""
    theta = xp.asarray(theta)
    out = {}
    for field in dict.fromkeys(lv.field for lv in levers):
        size = next(lv.mask.size for lv in levers if lv.field == field)
        masks = np.array([lv.mask if lv.field == field else np.zeros(size, bool)
                          for lv in levers], np.float64)  # [G, axis]: zero rows for other fields' levers
        out[field] = 1.0 + xp.asarray(masks).T @ (theta - 1.0)
    return out


def scaled_params(params: Any, theta: Any, levers: tuple[Lever, ...], xp: Any = np) -> Any:
    """``params`` with the levers' fields multiplied by ``theta [G]`` (``mm_rate`` with the
    tier rates ``tier_mm``, whose steps are the tiers' add-on)."""
    mult = multipliers(theta, levers, xp)
    new = {}
    if "mm_rate" in mult:
        new["mm_rate"] = params.mm_rate * mult["mm_rate"]
        new["tier_mm"] = params.tier_mm * mult["mm_rate"][:, None]
    for field in TABLES.values():
        if field in mult:
            new[field] = getattr(params, field) * mult[field]
    if "pm_mm_factor" in mult:
        new["pm_mm_factor"] = params.pm_mm_factor * mult["pm_mm_factor"][0]
    return dataclasses.replace(params, **new)


def scaled(snap: Any, factor: Any, levers: tuple[Lever, ...] | None = None) -> Any:
    """The snapshot with its margin parameters scaled: each lever by ``factor [G]``, or (``levers``
    None) its margin model's whole maintenance margin by ``factor`` (``default_vary``).

    The portfolio and var models' parameters are written into ``[margin]`` too, as the
    values to set there (``margin_keys``): ``mm_factor`` and a table naming every asset per
    ``TABLES`` key varied (``price_range``, ...).

    Raises:
      ValueError: a scale above a lever's ``top``, which ``[margin]`` would not accept.
    """
    levers = parse_vary(default_vary(snap), snap) if levers is None else levers
    theta = np.broadcast_to(np.asarray(factor, np.float64), (len(levers),))
    over = [lv.name for lv, t in zip(levers, theta) if t > lv.top * (1.0 + 1e-12)]
    if over:
        raise ValueError(f"{', '.join(over)}: a scale above what [margin] accepts")
    p = scaled_params(snap.params, theta, levers)
    cfg = dict(snap.margin_config)
    # min(): a scale at a lever's top can round past [margin]'s limit by an ulp
    if any(lv.field == "pm_mm_factor" for lv in levers):
        p = dataclasses.replace(p, pm_mm_factor=np.float64(min(float(p.pm_mm_factor), 1.0)))
        cfg["mm_factor"] = float(p.pm_mm_factor)
    for key, field in TABLES.items():
        if any(lv.field == field for lv in levers):
            p = dataclasses.replace(p, **{field: np.minimum(np.asarray(getattr(p, field)), _limit(key))})
            cfg[key] = dict(zip(snap.assets, np.asarray(getattr(p, field)).tolist()))
    return dataclasses.replace(snap, margin_config=cfg, params=p)


def margin_keys(snap: Any, levers: tuple[Lever, ...], scales: Any) -> dict:
    """The ``[margin]`` keys of the portfolio and var models' levers at ``scales``, as they
    would be set in ``exchange.toml``; ``{}`` for ``mm_rate`` levers (per-instrument rates)."""
    cfg = scaled(snap, scales, levers).margin_config
    keys = {}
    if any(lv.field == "pm_mm_factor" for lv in levers):
        keys["mm_factor"] = cfg["mm_factor"]
    for key, field in TABLES.items():
        if any(lv.field == field for lv in levers):
            # every underlying, varied or not: a table replaces the key's whole value, so an
            # underlying it left out would fall back to the built-in value, not today's
            keys[key] = {snap.assets[i]: cfg[key][snap.assets[i]]
                         for i in np.unique(np.asarray(snap.instruments.underlying))}
    return keys


def above_initial(snap: Any, levers: tuple[Lever, ...], scales: Any) -> list[str]:
    """The instruments (ids, sorted) whose maintenance rate passes their initial rate at ``scales``
    (``margin.mm_above_initial``): ``[margin]`` refuses such rates, so their initial rates
    must rise with them. Only ``mm_rate`` levers can (``mm_factor`` stops at 1)."""
    if not any(lv.field == "mm_rate" for lv in levers):
        return []
    over = margin.mm_above_initial(scaled(snap, scales, levers).params, snap.instruments.kind)
    return sorted(str(snap.instrument_ids[i]) for i in np.flatnonzero(over & ~margin.mm_above_initial(snap.params, snap.instruments.kind)))


def evaluate(snap: Any, scen: Any, factor: float, metric: str, chunk_size: int = 128,
             levers: tuple[Lever, ...] | None = None, direction: np.ndarray | None = None) -> dict:
    """One exact run (``engine.run``) at ``scales = factor * direction`` of ``levers``
    (``direction [G]``, ones by default; ``levers`` as ``scaled``): the metric and the total
    maintenance margin at the snapshot (USD)."""
    from . import engine

    levers = parse_vary(default_vary(snap), snap) if levers is None else levers
    scales = factor * (np.ones(len(levers)) if direction is None else np.asarray(direction, np.float64))
    res = engine.run(scaled(snap, scales, levers), scen, chunk_size=chunk_size)
    if metric == "worst_bad_debt":  # over the paths: no margin moves a one-off shock's bad debt
        value = res.scenarios.bad_debt.to_numpy()[np.asarray(scen.random, bool)].max()
    else:
        value = res.summary[metric]
    return {"factor": factor, "value": float("nan") if value is None else float(value),
            "maintenance_margin": float(res.accounts.maintenance_margin.sum()), "scales": [float(v) for v in scales]}


def _check(scen: Any, target: Target) -> None:
    if scen.steps < 2:
        raise InputError(scen.source.rsplit("/", 1)[-1] or "scenarios", None, None,
                         "every scenario is one step: an account's bad debt is max(0, -equity) whatever its "
                         "margin, so margin parameters have no effect here; calibrate on multi-step paths "
                         "([[montecarlo]] with steps > 1, or [[replay]] windows of several rows)")
    if not scen.random.any():  # paths are random scenarios; kept for a set built in Python
        raise InputError("--target", None, None, f"{target.metric} is taken over paths; the set has none")


def calibrate(snap: Any, scen: Any, target: Target, *, parameter: str | None = None, hi: float = 64.0,
              tolerance: float = 1e-3, chunk_size: int = 128,
              progress: Callable[[dict], None] | None = None) -> dict:
    """The smallest scale of ``parameter`` (to ``tolerance``) whose exact run meets ``target``.

    ``parameter``: one lever (``parse_vary``; default ``default_vary``: the margin model's whole
    maintenance margin) or several comma-separated (a vector, see the module docstring).
    Scales stay within ``[1/hi, min(hi, top)]`` per lever (``Lever.top``: what ``[margin]``
    accepts).

    Returns:
      A dict: ``factor`` (None when even the top misses the target), ``before`` and ``after``
      (evaluations at 1 and at ``factor``), ``below`` (at ``factor - tolerance``, failing),
      ``curve`` (every evaluation, sorted by margin: the margin-vs-metric trade-off), the
      ``target``, ``parameters`` (names of the levers searched), ``idle`` (names of the
      levers left as they are: ``idle_levers``, of several), ``tops`` (each lever's largest scale tried),
      ``scales`` (the recommended scale per lever, None when not met), ``margin`` (the
      ``[margin]`` keys to set, ``margin_keys``; None when not met) and ``above_initial``
      (instruments whose recommended maintenance rate passes their initial rate,
      ``above_initial``). ``worst_bad_debt`` is the largest over the set's paths (its
      random scenarios): a one-off shock's bad debt is the same whatever the margin, so it
      could only make a target unreachable. For a vector, ``factor``
      is the scale along ``direction`` (``scales = factor * direction``): the smooth
      solution's, or the one to every lever's top where no scale along it met the target
      (``fallback`` True); and ``smooth`` describes the smooth stage: its ``scales``, its
      smoothed ``value``, its exact ``check`` and whether that check ``met`` the target.

    Raises:
      InputError: the parameter is not searchable, the set has no paths (margin has no effect
        on losses there), or the metric needs random scenarios the set lacks.
    """
    levers = parse_vary(default_vary(snap) if parameter is None else parameter, snap)
    _check(scen, target)
    if not math.isfinite(hi) or hi < 1.0:
        raise InputError("--hi", None, None, f"{hi!r} must be a finite number >= 1")
    idle: list[str] = []
    relaxation = _relaxation(snap, scen, target) if len(levers) > 1 else None  # the vector's, built once
    if relaxation is not None:  # levers with no effect on this book stay as they are, off the ray
        mask = idle_levers(snap, scen, target, levers, relaxation)
        if mask.any() and not mask.all():
            idle = [lv.name for lv, m in zip(levers, mask) if m]
            levers = tuple(lv for lv, m in zip(levers, mask) if not m)
    tops = np.array([min(hi, lv.top) for lv in levers])
    for t in tops:  # before any run: a lever whose own range holds no grid point
        _check_grid(1.0 / hi, t, tolerance)
    uniform = np.ones(len(levers))
    seen: dict[tuple, dict] = {}

    def along(direction: np.ndarray) -> Callable[[float], dict]:
        def at(f: float, exact: bool = False) -> dict:
            on_grid = round(f / tolerance) * tolerance
            # today's values as they are, off the grid or not, and a top where it is asked for
            f = f if f == 1.0 or (exact and not math.isclose(f, on_grid, rel_tol=1e-9)) else on_grid
            key = (f, *direction.tolist())
            if key not in seen:
                seen[key] = evaluate(snap, scen, f, target.metric, chunk_size, levers, direction)
                if progress:
                    progress(seen[key])
            return seen[key]
        return at

    before = along(uniform)(1.0)  # today's values, cached: a fallback's bisection starts there
    if len(levers) == 1:
        res = _bisect(along(uniform), before, tops[0], tolerance, target, lo=1.0 / hi)
    else:
        res = _calibrate_vector(snap, scen, target, levers, tops, along, before, hi=hi, tolerance=tolerance,
                                relaxation=relaxation)
    res.update(target=target, parameters=tuple(lv.name for lv in levers), idle=idle, tops=[float(t) for t in tops],
               scales=None if res["factor"] is None else res["after"]["scales"],
               curve=sorted(seen.values(), key=lambda r: (r["maintenance_margin"], r["factor"])))
    res["margin"] = None if res["scales"] is None else margin_keys(snap, levers, res["scales"])
    res["above_initial"] = [] if res["scales"] is None else above_initial(snap, levers, res["scales"])
    return res


def _bisect(at: Callable[..., dict], before: dict, hi: float, tolerance: float, target: Target,
            start: float = 1.0, lo: float = 0.0) -> dict:
    """The smallest ``k * tolerance`` in ``[lo, hi]`` whose evaluation ``at`` meets the target,
    or ``hi`` itself, on the grid or not, where no grid point does, by bisection from ``start``
    (met there: search below it, else above), assuming the metric improves with the scale (met
    at a scale: met at every larger one). ``at(f, exact=True)`` evaluates ``f`` as it is, not
    rounded onto the grid."""
    lo_k, hi_k = _grid(lo, hi, tolerance)
    floor_k = lo_k
    top = at(hi, exact=True)  # a lever's top need not be on the grid; the answer may be it
    if not target.met(top["value"]):
        return {"factor": None, "before": before, "after": top, "below": None}
    if hi_k < lo_k or not target.met(at(hi_k * tolerance)["value"]):  # no grid point at or below it meets
        below = at(hi_k * tolerance) if hi_k >= lo_k else None
        return {"factor": top["factor"], "before": before, "after": top, "below": below}
    s_k = start / tolerance
    if target.met(at(start)["value"]):  # the grid points at or above start meet too
        hi_k = max(lo_k, min(hi_k, math.ceil(s_k - 1e-9)))
    else:  # and those at or below it fail
        lo_k = max(lo_k, math.floor(s_k + 1e-9) + 1)
    while lo_k < hi_k:  # met at hi_k; the answer is in [lo_k, hi_k]
        mid = (lo_k + hi_k) // 2
        if target.met(at(mid * tolerance)["value"]):
            hi_k = mid
        else:
            lo_k = mid + 1
    after = at(hi_k * tolerance)
    below = at((hi_k - 1) * tolerance) if hi_k > floor_k else None
    return {"factor": after["factor"], "before": before, "after": after, "below": below}


def _grid(lo: float, hi: float, tolerance: float) -> tuple[int, int]:
    """The first and last ``k`` of the scales ``k * tolerance`` within ``[lo, hi]`` (k >= 1;
    none when the last is below the first)."""
    return max(1, math.ceil(lo / tolerance - 1e-9)), math.floor(hi / tolerance + 1e-9)


def _check_grid(lo: float, hi: float, tolerance: float) -> None:
    lo_k, hi_k = _grid(lo, hi, tolerance)
    if hi_k < lo_k:
        raise InputError("--tolerance", None, None,
                         f"{tolerance:g} puts no scale on its grid within [{lo:g}, {hi:g}]; use a finer tolerance")


def _calibrate_vector(snap, scen, target, levers, tops, along, before, *, hi, tolerance, relaxation=None) -> dict:
    """Several levers: gradient descent on the smooth relaxation, then the exact check and the
    exact bisection of the scale along the solution's direction (module docstring). ``along``:
    the exact evaluations along a direction; ``tops [G]``: each lever's largest scale."""
    smooth = optimise(snap, scen, target, levers, hi, relaxation=relaxation)
    direction = np.asarray(smooth["scales"], np.float64)
    check = along(direction)(1.0)
    # the ray's scales keep every lever's scale within [1/hi, its top]
    res = _bisect(along(direction), before, (tops / direction).min(), tolerance, target, lo=1.0 / (hi * direction.min()))
    fallback = res["factor"] is None and not np.allclose(direction, tops / tops.max(), rtol=1e-12, atol=0.0)
    if fallback:
        # The relaxation can under-estimate the metric where it stopped, with a scale at its
        # top, so that its ray cannot reach the target though other points can: the ray to
        # every lever's top (every lever alike when the tops are hi) reaches the point of most
        # margin, so the target is out of reach only if that misses it too.
        direction = tops / tops.max()
        res = _bisect(along(direction), before, tops.max(), tolerance, target, lo=1.0 / (hi * direction.min()))
    smooth.update(check=check, met=target.met(check["value"]))
    res.update(direction=[float(v) for v in direction], smooth=smooth, fallback=fallback)
    return res


def _soft_path(params, inst, market, b, n: int, K: int, S: int, mm_scale):
    """Per account and scenario: equity at the soft first breach ``[n, S]``, and the asset
    prices at the last step ``[A, S]`` (see the module docstring). ``b`` is a
    ``sensitivities.Book`` of the snapshot and the ``K`` steps; ``mm_scale [n]`` USD."""
    A = b.spot_mult.shape[1]
    steps = lambda x: x[1:].reshape((K, S) + x.shape[1:])  # state order is step-major
    xs = (steps(b.spot_mult), steps(b.vol_shift), steps(b.horizon_days), jnp.arange(K))
    zero, lam = jnp.zeros(A), jnp.ones(n)

    @jax.checkpoint  # reverse mode recomputes a step's account arrays instead of keeping all K
    def step(carry, x):
        alive, eq_acc, _, settled = carry
        spot, vol, hor, k = x
        st = sens.account_states(zero, zero, params, lam, inst, market,
                                 dataclasses.replace(b, spot_mult=spot, vol_shift=vol, horizon_days=hor), n,
                                 settled=settled)
        breach = jax.nn.sigmoid((st["maintenance_margin"] - st["collateral"]) / mm_scale[:, None])
        stop = jnp.where(k == K - 1, 1.0, breach)  # the last step takes whoever is left
        return (alive * (1.0 - stop), eq_acc + alive * stop * st["equity"], st["price"], st["settled"]), None

    I = inst.kind.shape[0]
    init = (jnp.ones((n, S)), jnp.zeros((n, S)), jnp.zeros((A, S)), (jnp.zeros((I, S)), jnp.ones((I, S), bool)))
    (_, eq, price, _), _ = jax.lax.scan(step, init, xs)
    return eq, price


def smooth_metric(theta, params, inst, market, b, mm_scale, tau, *, levers: tuple[Lever, ...], metric: str, n: int,
                  K: int, S: int, n_random: int, level: float = 0.99):
    """The smooth relaxation of ``metric`` and the total maintenance margin at the snapshot
    (USD), at scales ``theta [G]`` of ``levers``. ``b``: the ``sensitivities.Book`` of the
    snapshot and every step; ``mm_scale [n]``, ``tau []``: USD widths of the soft breach and
    of the fund's depletion; the keywords are static."""
    p = scaled_params(params, theta, levers, jnp)
    if b.tier_step is not None and any(lv.field == "mm_rate" for lv in levers):  # tier steps scale with the rates
        b = dataclasses.replace(b, tier_step=b.tier_step * multipliers(theta, levers, jnp)["mm_rate"][:, None])
    eq, price = _soft_path(p, inst, market, b, n, K, S, mm_scale)
    bad = jnp.sum(jnp.maximum(-eq, 0.0), axis=0)  # [S]
    fund = b.fund @ price
    m = max(n_random, 1)
    if metric == "p_fund_depleted":
        value = jnp.sum(b.random * jax.nn.sigmoid((bad - fund) / tau)) / m
    elif metric == "bad_debt_mean":
        value = jnp.sum(b.random * bad) / m
    elif metric == "worst_bad_debt":
        value = tau * jax.nn.logsumexp(jnp.where(b.random > 0, bad, -jnp.inf) / tau)
    else:  # the tail of the random scenarios' bad debt, as engine.tail_loss
        size = n_random - math.ceil(level * n_random - 1e-9) + 1
        tail = jnp.sort(jnp.where(b.random > 0, bad, -jnp.inf))[::-1][:size]
        value = tail[-1] if metric == "bad_debt_q99" else jnp.mean(tail)
    return value, jnp.sum(_now(p, inst, market, b, n)["maintenance_margin"])


def _now(params, inst, market, b, n: int) -> dict:
    """``sensitivities.account_states`` at the snapshot only (``[n, 1]``)."""
    A = b.spot_mult.shape[1]
    now = dataclasses.replace(b, spot_mult=jnp.ones((1, A)), vol_shift=jnp.zeros((1, A)), horizon_days=jnp.zeros(1))
    return sens.account_states(jnp.zeros(A), jnp.zeros(A), params, jnp.ones(n), inst, market, now, n)


def _relaxation(snap: Any, scen: Any, target: Target) -> tuple[tuple, dict]:
    """``smooth_metric``'s arguments after ``theta`` and its static keywords but ``levers``, for
    the snapshot (the book of every path step, built once per calibration)."""
    b = sens.book(snap, scen)
    n = snap.n_accounts
    params = sens._float_params(snap.params)
    inst = sens.safe_instruments(snap.instruments, snap.market)
    # each account's soft-breach width: a share of its maintenance margin now, current rates
    mm_scale = BREACH_SOFTNESS * jnp.maximum(_now(params, inst, snap.market, b, n)["maintenance_margin"][:, 0], 1.0)
    statics = {"metric": target.metric, "n": n, "K": scen.steps, "S": len(scen), "n_random": int(scen.random.sum())}
    return (params, inst, snap.market, b, mm_scale, float(b.temperature)), statics


def idle_levers(snap: Any, scen: Any, target: Target, levers: tuple[Lever, ...], relaxation: tuple | None = None
                ) -> np.ndarray:
    """``[G]`` bool: the levers that move neither the smoothed metric nor the total maintenance
    margin at today's values (both derivatives exactly 0), such as a vol shock down on a book
    of short options only, whose risk matrices' worst points are all vol up. The exact stage's
    ray would scale them with the others, to no effect, into a recommendation that means
    nothing for this book and would bite a later one. ``relaxation``: ``_relaxation``'s, when
    the caller has it."""
    args, statics = relaxation or _relaxation(snap, scen, target)
    f = functools.partial(smooth_metric, levers=levers, **statics)
    jac = jax.jit(jax.jacfwd(lambda theta: jnp.stack(f(theta, *args))))(jnp.ones(len(levers)))
    return np.all(np.asarray(jac) == 0.0, axis=0)


def optimise(snap: Any, scen: Any, target: Target, levers: tuple[Lever, ...], hi: float = 64.0,
             relaxation: tuple | None = None) -> dict:
    """Stage 1: Adam on ``log theta`` of the augmented Lagrangian of the smooth relaxation,
    from ``theta = 1`` (today's values), every scale kept within ``[1 / hi, min(hi, top)]``.

    Returns ``{"scales": [G], "value": smoothed metric there, "maintenance_margin": USD,
    "history": one entry per round}``. ``relaxation``: ``_relaxation``'s, when the caller has it.
    """
    args, statics = relaxation or _relaxation(snap, scen, target)
    statics = {"levers": levers, **statics}
    G, tau, n_random = len(levers), args[-1], statics["n_random"]
    f = jax.jit(functools.partial(smooth_metric, **statics))
    mm1 = float(f(jnp.ones(G), *args)[1])
    h_scale = max(target.limit, tau if target.metric != "p_fund_depleted" else 1.0 / max(n_random, 1))

    def lagrangian(phi, lam, rho, *args):
        value, mm = smooth_metric(jnp.exp(phi), *args, **statics)
        h = (value - target.limit) / h_scale
        return mm / mm1 + lam * h + 0.5 * rho * jnp.maximum(h, 0.0) ** 2, (value, mm)

    grad = jax.jit(jax.value_and_grad(lagrangian, has_aux=True))
    phi = jnp.zeros(G)
    low, top = -math.log(hi), jnp.log(jnp.array([min(hi, lv.top) for lv in levers]))
    m1, m2 = jnp.zeros(G), jnp.zeros(G)
    lam, rho, t = 0.0, 10.0, 0
    history = []
    for r in range(ROUNDS):
        for _ in range(STEPS):
            t += 1
            _, g = grad(phi, lam, rho, *args)
            g = jnp.nan_to_num(g)
            m1 = 0.9 * m1 + 0.1 * g
            m2 = 0.999 * m2 + 0.001 * g * g
            phi = phi - LEARNING_RATE * (m1 / (1 - 0.9 ** t)) / (jnp.sqrt(m2 / (1 - 0.999 ** t)) + 1e-8)
            phi = jnp.clip(phi, low, top)  # scales within [1/hi, min(hi, top)]
        value, mm = (float(v) for v in f(jnp.exp(phi), *args))
        history.append({"round": r, "scales": [float(v) for v in np.exp(phi)], "value": value,
                        "maintenance_margin": mm})
        lam = max(0.0, lam + rho * (value - target.limit) / h_scale)
        rho *= 2.0
    return {"scales": history[-1]["scales"], "value": history[-1]["value"],
            "maintenance_margin": history[-1]["maintenance_margin"], "history": history}


def tradeoff_svg(result: dict) -> str:
    """The margin-vs-metric trade-off of the evaluations, as an SVG document."""
    import io

    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    curve = result["curve"]
    x = [r["maintenance_margin"] for r in curve]
    y = [r["value"] for r in curve]
    plt.rcParams["svg.hashsalt"] = "stress"
    fig, ax = plt.subplots(figsize=(6.4, 3.6))
    ax.plot(x, y, marker="o", color="#1f4e79")
    ax.axhline(result["target"].limit, color="#b00020", linestyle="--", label=f"target {result['target'].limit:g}")
    if result["factor"] is not None:
        ax.axvline(result["after"]["maintenance_margin"], color="#555555", linestyle=":", label="calibrated")
    ax.set_xlabel("total maintenance margin at the snapshot (USD)")
    ax.set_ylabel(result["target"].metric)
    ax.legend()
    fig.tight_layout()
    buf = io.StringIO()
    fig.savefig(buf, format="svg", metadata={"Date": None})
    plt.close(fig)
    return buf.getvalue()
