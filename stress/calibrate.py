"""Risk-committee calibration: the lowest maintenance margin that meets a loss target.

"Which maintenance-margin level keeps the probability of exhausting the insurance fund below
0.1% at the lowest margin?" Margin changes losses only through *when* accounts are closed
out: on a one-step scenario an account's bad debt is ``max(0, -equity)`` whatever its margin,
so calibration needs paths (Monte Carlo steps or replay windows), where a higher margin is
breached earlier and closes the account out before its equity runs out
(``liquidation.path_outcome``).

One scalar is searched exactly: every maintenance-margin rate is scaled by ``m``, and the
smallest ``m`` on a grid of ``tolerance`` whose exact run meets the target is found by
bisection. Bisection assumes the metric does not rise with margin, which holds path by path
when a higher margin only brings close-outs earlier; the result is re-checked exactly, and
the level one step below is reported as failing, so a non-monotone case shows.
"""

from __future__ import annotations

import dataclasses
import math
import re
from typing import Any, Callable

import numpy as np

from .errors import InputError

METRICS = ("p_fund_depleted", "worst_bad_debt", "bad_debt_mean", "bad_debt_q99", "bad_debt_es99")
PARAMETERS = ("mm_rate",)


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
    return Target(m.group(1), limit)


def scaled(snap: Any, factor: float) -> Any:
    """The snapshot with every maintenance-margin rate multiplied by ``factor``."""
    p = snap.params
    return dataclasses.replace(snap, params=dataclasses.replace(p, mm_rate=np.asarray(p.mm_rate) * factor))


def evaluate(snap: Any, scen: Any, factor: float, metric: str, chunk_size: int = 128) -> dict:
    """One exact run at ``factor``: the metric and the total maintenance margin at the snapshot."""
    from . import engine

    res = engine.run(scaled(snap, factor), scen, chunk_size=chunk_size)
    value = res.summary[metric]
    return {"factor": factor, "value": float("nan") if value is None else float(value),
            "maintenance_margin": float(res.accounts.maintenance_margin.sum())}


def calibrate(snap: Any, scen: Any, target: Target, *, parameter: str = "mm_rate", hi: float = 64.0,
              tolerance: float = 1e-3, chunk_size: int = 128,
              progress: Callable[[dict], None] | None = None) -> dict:
    """The smallest scale of ``parameter`` (to ``tolerance``) whose exact run meets ``target``.

    Returns:
      A dict: ``factor`` (None when even ``hi`` misses the target), ``before`` and ``after``
      (evaluations at 1 and at ``factor``), ``below`` (at ``factor - tolerance``, failing),
      ``curve`` (every evaluation, sorted by factor: the margin-vs-metric trade-off), and the
      ``target``.

    Raises:
      InputError: the parameter is not searchable, the set has no paths (margin has no effect
        on losses there), or the metric needs random scenarios the set lacks.
    """
    if parameter not in PARAMETERS:
        raise InputError("--vary", None, None, f"{parameter!r}: only {', '.join(PARAMETERS)} can be searched exactly "
                         "(a vector of parameters needs the smoothed gradient search, not built yet)")
    if scen.steps < 2:
        raise InputError(scen.source.rsplit("/", 1)[-1] or "scenarios", None, None,
                         "every scenario is one step: an account's bad debt is max(0, -equity) whatever its "
                         "margin, so margin parameters have no effect here; calibrate on multi-step paths "
                         "([[montecarlo]] with steps > 1, or [[replay]] windows of several rows)")
    if target.metric != "worst_bad_debt" and not scen.random.any():
        raise InputError("--target", None, None, f"{target.metric} is taken over random scenarios; the set has none")
    seen: dict[float, dict] = {}

    def at(f: float) -> dict:
        f = round(f / tolerance) * tolerance
        if f not in seen:
            seen[f] = evaluate(snap, scen, f, target.metric, chunk_size)
            if progress:
                progress(seen[f])
        return seen[f]

    before = at(1.0)
    top = at(hi)
    if not target.met(top["value"]):
        return {"factor": None, "before": before, "after": top, "below": None, "curve": sorted(seen.values(), key=lambda r: r["factor"]),
                "target": target}
    lo_n, hi_n = 0, round(hi / tolerance)  # search on the grid k * tolerance, k in (lo_n, hi_n]
    if target.met(before["value"]):
        hi_n = round(1.0 / tolerance)
    while hi_n - lo_n > 1:
        mid = (lo_n + hi_n) // 2
        if target.met(at(mid * tolerance)["value"]):
            hi_n = mid
        else:
            lo_n = mid
    after = at(hi_n * tolerance)
    below = at(lo_n * tolerance) if lo_n > 0 else None
    return {"factor": after["factor"], "before": before, "after": after, "below": below,
            "curve": sorted(seen.values(), key=lambda r: r["factor"]), "target": target}


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
