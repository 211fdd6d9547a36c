"""Reverse stress test: the smallest joint market move that exhausts the insurance fund.

A move is one multiplicative price move per asset and one additive implied-vol shift per
underlying of options, applied as a one-step scenario (instantaneous, horizon 0). The fund is
**exhausted** at a move when the engine's exchange-wide bad debt there is positive and at
least the fund's value at the moved prices plus the liquidation fees it collects, the
definition behind ``p_fund_depleted`` (``engine.run``).

"Smallest" is in one of two norms, over the move's coordinates ``z``:

- ``mahalanobis``: ``z`` holds the log price multipliers and the vol shifts;
  ``|z| = sqrt(z' Sigma^+ z)`` with ``Sigma`` the covariance of the same quantities over the
  scenario set's random scenarios (Monte Carlo paths or replay windows, their whole-horizon
  move). A combination the random scenarios never produce (a price they never move, an exact
  spot-vol link) lies outside ``Sigma``'s range and is not searched: its distance is infinite.
  Units: standard deviations of the set's horizon move.
- ``percent``: ``z`` holds the relative price moves (``-0.12`` is -12%) and the vol shifts
  (``0.10`` is +10 vol points, weighted like a 10% price move); ``|z|`` is Euclidean.

Search space: every price multiplier within ``[PRICE_BOUND_LO, PRICE_BOUND_HI]`` (x0.01 to
x100) and every vol shift within ``+-VOL_BOUND``. If no move inside exhausts the fund, the
result says so (``found`` False).

Method (the design point of structural reliability, Hasofer-Lind / Rackwitz-Fiessler, with an
exact line search). In whitened coordinates ``w`` (``z = M w``, ``M M' = Sigma``, so
``|z| = |w|``) the problem is ``min |w|`` subject to ``deficit(w) >= 0``, ``deficit = bad debt
- fund``. For a unit direction ``d`` the distance to exhaustion is the first ``t`` where the
fund is exhausted at ``t d``: found on a grid of ``RAY_GRID`` points up to the bound, then
narrowed by repeated sub-grids on the unsmoothed exchange function (``sensitivities.totals``,
exact for a one-step scenario except liquidation fees). Directions start from each single
factor moved with its regression on the others (``M M' e_j``, ``e_j`` itself for percent),
both signs, and the gradient of a smoothed deficit at no move; the best ``STARTS`` are
improved by turning ``d`` toward the gradient of the smoothed deficit at its crossing point
(at the minimum-norm point the gradient is parallel to ``w``), accepting a turn only when the
exact distance falls, halving the turn otherwise. The smoothed deficit replaces each account's
``max(0, -equity)`` by ``tau * softplus(-equity / tau)``, ``tau`` annealed from
``TAU_START`` to ``TAU_END`` of the fund's value, so accounts near bankruptcy steer the search
before they default. Finally the crossing on the chosen ray is checked and, if needed, re-found
by bisection with the engine itself (``engine.run`` on a one-scenario set), so the reported
move exhausts the fund in the engine and a move a relative ``RAY_TOLERANCE`` shorter does not.
The answer is a local minimum (the problem is not convex: longs fear falls, shorts rises), the
best of several starts; the distance along its ray is exact.
"""

from __future__ import annotations

import dataclasses
import functools
import sys
import types
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from . import sensitivities as sens
from .errors import InputError
from .scenarios import Scenarios
from .snapshot import OPTION, Snapshot

TARGETS = ("fund-exhausted",)
NORMS = ("mahalanobis", "percent")
PRICE_BOUND_LO, PRICE_BOUND_HI = 0.01, 100.0  # price multipliers searched: x0.01 .. x100
VOL_BOUND = 2.0  # vol shifts searched: -2.00 .. +2.00 (200 vol points; vols floor at 0.01)
RAY_GRID = 64  # points of the first-crossing grid along a ray, denser near no move
RAY_ROUNDS = 9  # sub-grid rounds narrowing the crossing, each by a factor 8
RAY_TOLERANCE = 1e-6  # relative width of the engine-checked bracket of the crossing
STARTS = 3  # directions improved by the gradient iteration
ITERATIONS = 40  # gradient turns per start, at most
TAU_START, TAU_END = 0.05, 1e-4  # smoothing of each account's bad debt, of the fund's value
EIGEN_FLOOR = 1e-10  # covariance eigenvalues below this share of the largest are dropped
BATCH = 64  # moves evaluated per call of the exchange function (fixed shape: one compile)


@dataclasses.dataclass(frozen=True)
class ReverseResult:
    """The smallest fund-exhausting move found, checked with the engine.

    ``moves``: DataFrame, one row per asset: ``asset``, ``price_before``, ``price_after``
    (USD), ``price_move`` (relative, -0.12 = -12%), ``vol_shift`` (absolute; NaN for assets
    that are no option's underlying). ``accounts``: the ``top`` accounts by bad debt at the
    move: ``account_id``, ``bad_debt`` (USD), ``share`` of the exchange's bad debt there.
    Money in USD at the moved prices. When ``found`` is False the move fields are empty and
    ``message`` says why.
    """

    found: bool
    target: str
    norm: str  # "mahalanobis" or "percent"
    distance: float  # the move's norm (standard deviations, or the Euclidean percent norm)
    moves: Any  # pandas DataFrame
    bad_debt: float  # exchange bad debt at the move (engine), USD
    fund: float  # the insurance fund's value at the moved prices, USD
    fees: float  # liquidation fees credited to the fund at the move, USD
    exhausted: bool  # the engine says the fund is exhausted at the move
    exhausted_at_98: bool  # ... and at 0.98 x the move (False when minimal along the ray)
    accounts: Any  # pandas DataFrame
    random_scenarios: int  # random scenarios the covariance was estimated from (0: percent)
    bound: str
    message: str

    def to_dict(self) -> dict:
        """JSON-ready: the scalars, ``moves`` and ``accounts`` as lists of records."""
        out = {f.name: getattr(self, f.name) for f in dataclasses.fields(self) if f.name not in ("moves", "accounts")}
        out["distance"] = _finite(self.distance)
        for k in ("bad_debt", "fund", "fees"):
            out[k] = _finite(getattr(self, k))
        out["moves"] = [{k: _finite(v) if isinstance(v, float) else v for k, v in r.items()}
                        for r in self.moves.to_dict("records")]
        out["accounts"] = self.accounts.to_dict("records")
        return out


def _finite(v: float) -> float | None:
    return float(v) if np.isfinite(v) else None


@dataclasses.dataclass(frozen=True)
class Space:
    """The searched coordinates: ``z = M w``, ``z [D]`` = price coordinates of ``price_assets``
    then vol shifts of ``vol_assets``; ``M [D, k]``; ``|w|`` is the move's norm."""

    norm: str
    price_assets: np.ndarray  # [P] asset indices
    vol_assets: np.ndarray  # [U] asset indices (underlyings of options)
    M: np.ndarray  # [D, k]
    random_scenarios: int

    def market(self, z: Any, A: int, xp: Any = np) -> tuple[Any, Any]:
        """``z [..., D]`` -> price multipliers and vol shifts ``[..., A]`` (1 and 0 elsewhere)."""
        P = len(self.price_assets)
        zp, zv = z[..., :P], z[..., P:]
        mult = xp.exp(zp) if self.norm == "mahalanobis" else 1.0 + zp
        shape = z.shape[:-1] + (A,)
        if xp is np:
            m, v = np.ones(shape), np.zeros(shape)
            m[..., self.price_assets] = mult
            v[..., self.vol_assets] = zv
            return m, v
        m = jnp.ones(shape, z.dtype).at[..., self.price_assets].set(mult)
        v = jnp.zeros(shape, z.dtype).at[..., self.vol_assets].set(zv)
        return m, v

    def t_max(self, d: np.ndarray) -> float:
        """The largest ``t`` keeping ``z = t M d`` inside the bounds."""
        z = self.M @ d
        P = len(self.price_assets)
        if self.norm == "mahalanobis":
            lo, hi = np.log(PRICE_BOUND_LO), np.log(PRICE_BOUND_HI)
        else:
            lo, hi = PRICE_BOUND_LO - 1.0, PRICE_BOUND_HI - 1.0
        lo = np.r_[np.full(P, lo), np.full(len(self.vol_assets), -VOL_BOUND)]
        hi = np.r_[np.full(P, hi), np.full(len(self.vol_assets), VOL_BOUND)]
        with np.errstate(divide="ignore"):
            reach = np.where(z > 1e-300, hi / z, np.where(z < -1e-300, lo / z, np.inf))
        return float(reach.min())


def space(snap: Snapshot, scen: Scenarios | None, norm: str | None) -> Space:
    """The search coordinates for ``norm`` (None: Mahalanobis when ``scen`` has random
    scenarios, else percent); the covariance from the random scenarios' horizon moves."""
    A = snap.n_assets
    inst = snap.instruments
    vol_assets = np.unique(np.asarray(inst.underlying)[np.asarray(inst.kind) == OPTION]).astype(np.int64)
    price_assets = np.arange(A)
    n_random = int(scen.random.sum()) if scen is not None else 0
    if norm is None:
        norm = "mahalanobis" if n_random else "percent"
    if norm not in NORMS:
        raise InputError("--norm", None, None, f"{norm!r}: expected one of {', '.join(NORMS)}")
    if norm == "percent":
        D = A + len(vol_assets)
        return Space(norm, price_assets, vol_assets, np.eye(D), 0)
    if n_random < 2:
        raise InputError(scen.source.rsplit("/", 1)[-1] if scen is not None and scen.source else "--scenarios",
                         None, None, "the Mahalanobis norm needs the covariance of random scenarios (Monte Carlo or "
                         "replay) and the set has fewer than two; use --norm percent")
    rnd = scen.random
    F = np.hstack([np.log(scen.spot_mult[rnd]), scen.vol_shift[rnd][:, vol_assets]])  # [m, D] horizon moves
    cov = np.atleast_2d(np.cov(F, rowvar=False))
    lam, V = np.linalg.eigh(cov)
    keep = lam > EIGEN_FLOOR * max(lam.max(), 0.0)
    if not keep.any():
        raise InputError(scen.source.rsplit("/", 1)[-1] or "scenarios", None, None,
                         "the random scenarios move no price or vol: no covariance to measure moves by")
    return Space(norm, price_assets, vol_assets, V[:, keep] * np.sqrt(lam[keep]), n_random)


@functools.partial(jax.jit, static_argnames=("n",))
def _exhaustion(mult, dv, params, inst, market, b: sens.Book, n: int):
    """Exact bad debt and fund value at each of ``B`` moves (``mult, dv [B, A]``), USD ``[B]``,
    by ``sensitivities.totals`` on a book whose scenarios are the moves (no fees)."""
    A = mult.shape[1]
    b = dataclasses.replace(b, spot_mult=jnp.concatenate([jnp.ones((1, A)), mult]),
                            vol_shift=jnp.concatenate([jnp.zeros((1, A)), dv]))
    t = sens.totals(jnp.zeros(A), jnp.zeros(A), params, jnp.ones(n), inst, market, b, n)
    return t["bad_debt"][1:], t["insurance_fund_before"][1:]


def _smooth_deficit(z, tau, to_market, params, inst, market, b: sens.Book, n: int):
    """Smoothed ``bad debt - fund`` at ``z [D]``, USD: each account's ``max(0, -equity)`` as
    ``tau * softplus(-equity / tau)``; ``b`` holds the identity scenario, so ``x = mult - 1``
    moves it (and the snapshot state, unused) to the move."""
    mult, dv = to_market(z)
    st = sens.account_states(mult - 1.0, dv, params, jnp.ones(n), inst, market, b, n)
    eq = st["equity"][:, 1]
    return jnp.sum(tau * jax.nn.softplus(-eq / tau)) - b.fund @ st["price"][:, 1]


class _Problem:
    """The exchange as functions of the whitened move ``w``: exact exhaustion on batches of
    moves, the smoothed deficit's gradient, and the engine's verdict."""

    def __init__(self, snap: Snapshot, sp: Space, chunk_size: int):
        self.snap, self.sp, self.chunk_size = snap, sp, chunk_size
        A, self.n = snap.n_assets, snap.n_accounts
        one = lambda S: Scenarios(names=tuple(f"m{i}" for i in range(S)), kinds=("explicit",) * S,
                                  spot_mult=np.ones((S, A)), vol_shift=np.zeros((S, A)), horizon_days=np.zeros(S))
        self.params = sens._float_params(snap.params)
        self.market = snap.market
        self.inst = sens.safe_instruments(snap.instruments, self.market)
        self.batch_book = sens.book(snap, one(BATCH))
        self.point_book = sens.book(snap, one(1))
        self.fund_now = float(np.asarray(snap.insurance_fund, np.float64) @ np.asarray(snap.market.price, np.float64))
        M = jnp.asarray(sp.M)
        to_market = lambda z: sp.market(z, A, jnp)
        f = functools.partial(_smooth_deficit, to_market=to_market, params=self.params, inst=self.inst,
                              market=self.market, b=self.point_book, n=self.n)
        self._grad = jax.jit(jax.grad(lambda w, tau: f(M @ w, tau)))
        self.evaluations = 0

    def exhausted(self, W: np.ndarray) -> np.ndarray:
        """``[B]`` bool: the fund is exhausted (bad debt > 0 and >= fund) at moves ``w [B, k]``."""
        out = []
        for lo in range(0, len(W), BATCH):
            part = W[lo:lo + BATCH]
            pad = np.vstack([part, np.zeros((BATCH - len(part), part.shape[1]))])
            mult, dv = self.sp.market(pad @ self.sp.M.T, self.snap.n_assets)
            bad, fund = (np.asarray(v)[: len(part)] for v in _exhaustion(
                mult, dv, self.params, self.inst, self.market, self.batch_book, n=self.n))
            out.append((bad > 0) & (bad >= fund))
            self.evaluations += len(part)
        return np.concatenate(out)

    def gradient(self, w: np.ndarray, tau: float) -> np.ndarray:
        return np.asarray(self._grad(jnp.asarray(w), tau))

    def crossing(self, d: np.ndarray) -> tuple[float, float] | None:
        """``(lo, hi)``: the first crossing along the unit direction ``d`` lies between (the
        fund is not exhausted at ``lo d``, it is at ``hi d``), relative width below ~1e-8;
        None when no point of the grid up to the bound exhausts it."""
        tmax = self.sp.t_max(d)
        if not np.isfinite(tmax):
            return None
        ts = tmax * (np.arange(1, RAY_GRID + 1) / RAY_GRID) ** 2  # denser near no move
        hit = self.exhausted(ts[:, None] * d[None, :])
        if not hit.any():
            return None
        k = int(np.argmax(hit))
        lo, hi = (ts[k - 1] if k else 0.0), ts[k]
        for _ in range(RAY_ROUNDS):
            inner = np.linspace(lo, hi, 9)[1:-1]
            hit = self.exhausted(inner[:, None] * d[None, :])
            if hit.any():
                j = int(np.argmax(hit))
                lo, hi = (inner[j - 1] if j else lo), inner[j]
            else:
                lo = inner[-1]
        return lo, hi

    def engine(self, w: np.ndarray):
        """The engine's run of the one-step scenario of move ``w``: ``(exhausted, result)``."""
        from . import engine

        mult, dv = self.sp.market(self.sp.M @ w, self.snap.n_assets)
        scen = Scenarios(names=("reverse",), kinds=("explicit",), spot_mult=mult[None], vol_shift=dv[None],
                         horizon_days=np.zeros(1), source="reverse")
        res = engine.run(self.snap, scen, chunk_size=self.chunk_size)
        row = res.scenarios.iloc[0]
        bad, fund, fees = float(row.bad_debt), float(row.insurance_fund_before), float(row.fees)
        return bool(bad > 0 and bad >= fund + fees), res


def _unit(v: np.ndarray) -> np.ndarray | None:
    n = float(np.linalg.norm(v))
    return v / n if n > 0 and np.isfinite(n) else None


def _improve(pb: _Problem, d: np.ndarray, bracket: tuple[float, float]) -> tuple[np.ndarray, tuple[float, float]]:
    """Turn ``d`` toward the smoothed deficit's gradient at its crossing while the exact
    distance falls (damped Hasofer-Lind / Rackwitz-Fiessler iteration): a full turn first,
    then halves down to 1/64; when none helps, the smoothing is cut tenfold and the gradient
    taken again, down to ``TAU_END``."""
    scale = max(pb.fund_now, 1.0)
    tau = TAU_START * scale
    for _ in range(ITERATIONS):
        g = _unit(pb.gradient(bracket[1] * d, tau))
        moved = False
        if g is not None and float(g @ d) < 1.0 - 1e-12:  # else stationary: the gradient is along the ray
            alpha = 1.0
            while alpha >= 1.0 / 64 and not moved:
                cand = _unit((1.0 - alpha) * d + alpha * g)
                got = pb.crossing(cand) if cand is not None else None
                if got is not None and got[1] < bracket[1] * (1.0 - 1e-9):
                    d, bracket, moved = cand, got, True
                alpha /= 2.0
        if not moved:
            if tau <= TAU_END * scale:
                break
            tau = max(tau / 10.0, TAU_END * scale)
    return d, bracket


def reverse(snap: Snapshot, scen: Scenarios | None = None, target: str = "fund-exhausted", *,
            norm: str | None = None, top: int = 10, chunk_size: int = 128) -> ReverseResult:
    """The smallest joint move of prices and vols that exhausts the insurance fund.

    Args:
      snap: the snapshot. scen: a scenario set whose random scenarios (Monte Carlo, replay)
        give the covariance of the Mahalanobis norm; None for the percent norm.
      target: ``"fund-exhausted"`` (the only target).
      norm: ``"mahalanobis"``, ``"percent"``, or None: Mahalanobis when ``scen`` has random
        scenarios, else percent.
      top: accounts reported, largest bad debt at the move first.
      chunk_size: accounts per chunk of the engine's check (results do not depend on it).

    Returns:
      ``ReverseResult`` (see the module docstring for the method and the bounds).

    Raises:
      InputError: an unknown target or norm, or a Mahalanobis norm without random scenarios.
    """
    if target not in TARGETS:
        raise InputError("--target", None, None, f"{target!r}: expected one of {', '.join(TARGETS)}")
    if not (isinstance(top, int) and top >= 1):
        raise InputError("--top", None, None, f"{top!r} must be a whole number >= 1")
    sp = space(snap, scen, norm)
    pb = _Problem(snap, sp, chunk_size)
    k = sp.M.shape[1]
    bound = (f"price multipliers x{PRICE_BOUND_LO:g} to x{PRICE_BOUND_HI:g}, vol shifts within "
             f"+-{VOL_BOUND:g} (+-{VOL_BOUND * 100:g} vol points)")
    zero = np.zeros(k)
    at_zero, res0 = pb.engine(zero)
    if at_zero:
        return _result(snap, sp, pb, zero, 0.0, True, res0, False, top, target, bound,
                       "the fund is already exhausted at the snapshot (no move needed)")
    # Starting directions: every factor moved alone with its regression on the others, both
    # signs, and the smoothed deficit's gradient at no move.
    starts = [u for j in range(sp.M.shape[0]) for s in (1.0, -1.0) if (u := _unit(s * sp.M[j])) is not None]
    g0 = _unit(pb.gradient(zero, max(pb.fund_now, 1.0) * TAU_START))
    if g0 is not None:
        starts.append(g0)
    found = [(got, d) for d in starts if (got := pb.crossing(d)) is not None]
    if not found:
        return _not_found(snap, sp, pb, target, bound)
    found.sort(key=lambda r: r[0][1])
    best = None
    for bracket, d in found[:STARTS]:
        d, bracket = _improve(pb, d, bracket)
        if best is None or bracket[1] < best[1][1]:
            best = (d, bracket)
    d, (lo, hi) = best
    return _engine_ray(snap, sp, pb, d, lo, hi, top, target, bound)


def _engine_ray(snap, sp, pb: _Problem, d, lo, hi, top, target, bound) -> ReverseResult:
    """The crossing on the ray ``d`` by the engine's verdict: widen ``hi`` until the engine
    says exhausted (liquidation fees feed the fund), narrow ``lo`` until it says not, bisect
    to ``RAY_TOLERANCE``."""
    tmax = sp.t_max(d)
    ok, res = pb.engine(hi * d)
    while not ok:
        if hi >= tmax:
            return _not_found(snap, sp, pb, target, bound,
                              "the smoothed search found a move, but with liquidation fees credited to the fund "
                              "the engine says the fund survives every move along it up to the bound")
        hi = min(hi * 1.01, tmax)
        ok, res = pb.engine(hi * d)
    while lo > 0 and pb.engine(lo * d)[0]:
        lo = lo / 2 if lo > 1e-9 * hi else 0.0
    while hi - lo > RAY_TOLERANCE * hi:
        mid = 0.5 * (lo + hi)
        ok_mid, res_mid = pb.engine(mid * d)
        if ok_mid:
            hi, res = mid, res_mid
        else:
            lo = mid
    below = pb.engine(0.98 * hi * d)[0]
    return _result(snap, sp, pb, hi * d, hi, True, res, below, top, target, bound,
                   f"the fund is exhausted at this move ({sp.norm} norm {hi:.6g}); "
                   f"at 0.98 x the move it is {'still exhausted (not minimal along its ray)' if below else 'not'}")


def _not_found(snap, sp, pb, target, bound, why: str | None = None) -> ReverseResult:
    import pandas as pd

    msg = why or f"no move within the bound ({bound}) exhausts the insurance fund"
    empty = pd.DataFrame({"asset": pd.Series([], dtype=object), "price_before": [], "price_after": [],
                          "price_move": [], "vol_shift": []})
    accounts = pd.DataFrame({"account_id": pd.Series([], dtype=object), "bad_debt": [], "share": []})
    nan = float("nan")
    return ReverseResult(False, target, sp.norm, nan, empty, nan, nan, nan, False, False, accounts,
                         sp.random_scenarios, bound, msg)


def _result(snap, sp, pb, w, t, exhausted, res, below, top, target, bound, message) -> ReverseResult:
    import pandas as pd

    mult, dv = sp.market(sp.M @ w, snap.n_assets)
    price = np.asarray(snap.market.price, np.float64)
    vol = np.full(snap.n_assets, np.nan)
    vol[sp.vol_assets] = dv[sp.vol_assets]
    moves = pd.DataFrame({"asset": np.asarray(snap.assets, dtype=object), "price_before": price,
                          "price_after": price * mult, "price_move": mult - 1.0, "vol_shift": vol})
    row = res.scenarios.iloc[0]
    acc = res.accounts[["account_id", "bad_debt_worst"]].rename(columns={"bad_debt_worst": "bad_debt"})
    total = float(acc.bad_debt.sum())
    acc = acc[acc.bad_debt > 0].sort_values(["bad_debt", "account_id"], ascending=[False, True], kind="stable")
    acc = acc.head(top).reset_index(drop=True)
    acc["share"] = acc.bad_debt / total if total > 0 else np.nan
    return ReverseResult(True, target, sp.norm, float(t), moves, float(row.bad_debt),
                         float(row.insurance_fund_before), float(row.fees), exhausted, below, acc,
                         sp.random_scenarios, bound, message)


class _CallableModule(types.ModuleType):
    """``stress.reverse`` is the function of the public API, and also this module's name: the
    import system binds the package attribute to the module whenever the module is imported
    first, so the module forwards calls to the function."""

    def __call__(self, *args: Any, **kwargs: Any) -> ReverseResult:
        return reverse(*args, **kwargs)


sys.modules[__name__].__class__ = _CallableModule
