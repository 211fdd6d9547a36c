"""Margin requirements: the ``standard`` model (isolated-style, summed over positions, with
optional risk-limit tiers) and the ``portfolio`` model (a Deribit-style risk matrix per account
and underlying). The rules, parameters and worked examples are in docs/margin.md.

Standard model (USD per contract, at the scenario's prices; ``S`` the underlying price, ``m``
the option's value per coin in USD, ``n`` the notional per contract of SPEC section 2):

- futures and perpetuals: ``IM = im_rate * n``, ``MM = mm_rate * n``, on long and short
  positions alike (Deribit's base rates: IM 2%, MM 1%). With ``[margin] future_tiers`` the
  rates are those of the risk-limit tier the *position's* notional falls in
  (``tier_margin``), as on Binance and Bybit.
- short options, Deribit standard option margin (contract on ``c`` coins):
  ``IM = c * (max(a - OTM/S, b) * S + m)``, with puts floored at their MM;
  ``MM = c * (mm_rate * S + m)`` for calls and ``c * (max(mm_rate * S, mm_rate * m) + m)`` for
  puts, where ``OTM = max(K - S, 0)`` for calls and ``max(S - K, 0)`` for puts, ``a = im_rate``
  (0.15), ``b = option_im_floor`` (0.10), ``mm_rate`` 0.075.
- long options: none (the premium is paid; its value already counts in equity).

An account's requirement is the sum over its positions of ``weight * per-contract
requirement``, with weight ``|quantity|`` for futures and ``max(-quantity, 0)`` for options.

Portfolio model, per account and underlying: every instrument is revalued once per grid point
(price moves of +-``price_range`` in ``buckets`` steps each side, times vol up / unchanged /
down, plus an extended table of large moves on vol up); positions are gathered with segment
sums; the requirement is the worst loss, plus a roll shock per future and a delta shock above
a threshold; ``MM = mm_factor * IM``.
"""

from __future__ import annotations

import dataclasses
import functools
import math
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from .errors import InputError
from .portfolio import Haircut, keep_share
from .pricing import YEAR_DAYS, floor_vol, revalue
from .snapshot import OPTION, PERPETUAL, Instruments, Market, Params, account_id_column, names_at

MODELS = ("standard", "portfolio", "var")
VOL_SCENARIOS = ("up", "unchanged", "down")  # order of the vol axis of the risk matrix

# Defaults of exchange.toml [margin] for the standard model; see the module docstring. The
# sample exchange writes these into its exchange.toml, so they stay plain numbers.
DEFAULTS = {
    "model": "standard",
    "future_im_rate": 0.02,
    "future_mm_rate": 0.01,
    "option_im_rate": 0.15,
    "option_im_floor": 0.10,
    "option_mm_rate": 0.075,
}
TIERS_KEY = "future_tiers"  # optional risk-limit tiers: [[notional_up_to_usd, im_rate, mm_rate], ...]

# Portfolio-model defaults: Deribit's published BTC parameters (private/pme/simulate,
# model_params) where it has them; see docs/margin.md. A table {BTC = ..., default = ...}
# gives per-underlying values (``pnl_offset``: per settlement asset).
PORTFOLIO_DEFAULTS: dict[str, Any] = {
    "price_range": {"BTC": 0.16, "default": 0.20},
    "buckets_count": 4,
    "volatility_range_up": 0.5,
    "volatility_range_down": 0.25,
    "min_volatility_for_shock_up": 0.5,
    "short_term_vega_power": 0.3,
    "long_term_vega_power": 0.13,
    "min_dte_days": 1.0,
    "extended_moves": [-0.66, -0.33, 0.5, 1.0, 2.0, 3.0, 4.0, 5.0],
    "extended_pnl_fraction": 0.03,
    "pnl_offset": 0.0,
    "annualised_move_risk": {"BTC": 0.075, "default": 0.1},
    "min_annualised_move": 0.01,
    "max_delta_shock": 0.1,
    "delta_shock_threshold": 20_000_000.0,
    "mm_factor": 0.8,
}
# The var model (Eurex Prisma / OCC STANS style): expected shortfall of each account's whole
# portfolio over historical (by default filtered) windows of the liquidation horizon.
VAR_DEFAULTS: dict[str, Any] = {
    "var_history": None,  # price history (CSV or Parquet), relative to the snapshot folder
    "var_horizon_days": 2.0,  # liquidation horizon: the length of each window
    "confidence": 0.99,  # ES level
    "var_filtered": True,  # filtered historical simulation (EWMA vol rescaling)
    "var_lambda": 0.94,  # EWMA decay of the filter
    "var_floor": 0.5,  # IM is at least this fraction of the standard model's IM
    "var_min_windows": 250,  # fewer windows than this: an input error, not a margin
}
# Dynamic haircuts (docs/margin.md, "Dynamic haircuts"): off by default, as SPEC section 2's
# static haircuts are the contract. ``haircut_reference_vol`` defaults, per asset, to the median
# mark_iv of the snapshot's options on it (assets without options: not vol-scaled).
HAIRCUT_DEFAULTS: dict[str, Any] = {
    "haircut_model": "static",  # "static" or "dynamic"
    "haircut_reference_vol": None,  # per asset: the annualised vol at which the asset's haircut holds
    "haircut_daily_volume": 0.0,  # per asset: USD traded per day; 0: no concentration add-on
    "haircut_concentration": 0.1,  # per asset: add-on per sqrt(USD held / daily volume)
    "haircut_max": 0.95,  # the largest haircut, < 1
}
HAIRCUT_MODELS = ("static", "dynamic")
# Per-asset keys -> (Params field, lowest allowed, highest allowed, lowest inclusive).
_PER_ASSET = {
    "price_range": ("pm_price_range", 0.0, 0.99, False),
    "volatility_range_up": ("pm_vol_up", 0.0, math.inf, True),
    "volatility_range_down": ("pm_vol_down", 0.0, math.inf, True),
    "min_volatility_for_shock_up": ("pm_min_vol_up", 0.0, 5.0, True),
    "short_term_vega_power": ("pm_short_vega_power", 0.0, math.inf, True),
    "long_term_vega_power": ("pm_long_vega_power", 0.0, math.inf, True),
    "extended_pnl_fraction": ("pm_extended_fraction", 0.0, 1.0, True),
    "pnl_offset": ("pm_pnl_offset", 0.0, 1.0, True),
    "annualised_move_risk": ("pm_move_risk", 0.0, math.inf, True),
    "min_annualised_move": ("pm_min_move", 0.0, math.inf, True),
    "max_delta_shock": ("pm_max_delta_shock", 0.0, math.inf, True),
    "delta_shock_threshold": ("pm_delta_threshold", 0.0, math.inf, True),
}
_FILE = "exchange.toml"


# --------------------------------------------------------------------------------------------
# Configuration


def _err(key: str, message: str) -> InputError:
    return InputError(_FILE, "[margin]", key, message)


def _is_number(v: Any) -> bool:
    return not isinstance(v, bool) and isinstance(v, (int, float)) and not math.isnan(v)


def _checked(key: str, v: Any, lo: float, hi: float, lo_inclusive: bool = True) -> float:
    if not _is_number(v) or not math.isfinite(v):
        raise _err(key, f"{v!r} is not a finite number")
    if v < lo or (v == lo and not lo_inclusive) or v > hi:
        low = "[" if lo_inclusive else "("
        raise _err(key, f"{v!r} is outside {low}{lo:g}, {hi:g}]")
    return float(v)


def _per_asset(key: str, given: Any, builtin: Any, assets: tuple[str, ...] | None, n_assets: int,
               check) -> np.ndarray:
    """``[A]`` values of a per-asset key: a number for all assets, or a table of asset name ->
    number with an optional ``default``; assets the user's table leaves out keep the built-in
    value. Without asset names (``assets`` None) named entries are validated but not applied."""
    out = np.empty(n_assets)
    for layer_key, layer in (("builtin", builtin), (key, given)):
        if layer is None:
            continue
        if not isinstance(layer, dict):
            out[:] = check(key, layer)
            continue
        for name, v in layer.items():
            check(f"{key}.{name}", v)
        if "default" in layer:
            out[:] = check(f"{key}.default", layer["default"])
        for name, v in layer.items():
            if name == "default" or assets is None:
                continue
            if name not in assets:
                if layer_key == "builtin":
                    continue  # a built-in value for an asset this snapshot does not have
                raise _err(f"{key}.{name}", f"unknown asset {name!r} (known: {', '.join(assets)})")
            out[assets.index(name)] = check(f"{key}.{name}", v)
    return out


def _tier_rows(key: str, rows: Any) -> np.ndarray:
    """Validate one tier list ``[[notional_up_to_usd, im_rate, mm_rate], ...]`` -> ``[k, 3]``."""
    if not isinstance(rows, list) or not rows:
        raise _err(key, "must be a non-empty list of [notional_up_to_usd, im_rate, mm_rate] rows")
    out = np.empty((len(rows), 3))
    for k, row in enumerate(rows):
        where = f"tier {k + 1}"
        if not isinstance(row, list) or len(row) != 3 or not all(_is_number(v) for v in row):
            raise _err(key, f"{where}: {row!r} is not [notional_up_to_usd, im_rate, mm_rate]")
        bound, im, mm = (float(v) for v in row)
        if not bound > 0:
            raise _err(key, f"{where}: notional bound {bound:g} must be > 0")
        if not (math.isfinite(im) and math.isfinite(mm) and 0 <= mm <= im):
            raise _err(key, f"{where}: rates must satisfy 0 <= mm_rate <= im_rate (got im {im:g}, mm {mm:g})")
        if k and bound <= out[k - 1, 0]:
            raise _err(key, f"{where}: notional bounds must increase ({bound:g} <= {out[k - 1, 0]:g})")
        if k and (im < out[k - 1, 1] or mm < out[k - 1, 2]):
            raise _err(key, f"{where}: rates must not decrease from one tier to the next")
        out[k] = bound, im, mm
    return out


def _tiers(given: Any, assets: tuple[str, ...] | None, n_assets: int, flat: tuple[float, float]) -> list[np.ndarray]:
    """Tier table ``[k_a, 3]`` of each asset as underlying; flat rates where none is given."""
    flat_rows = np.array([[math.inf, flat[0], flat[1]]])
    out = [flat_rows] * n_assets
    if given is None:
        return out
    if isinstance(given, list):
        return [_tier_rows(TIERS_KEY, given)] * n_assets
    if not isinstance(given, dict):
        raise _err(TIERS_KEY, "must be a list of [notional_up_to_usd, im_rate, mm_rate] rows, "
                              "or a table of such lists per underlying")
    parsed = {name: _tier_rows(f"{TIERS_KEY}.{name}", rows) for name, rows in given.items()}
    if "default" in parsed:
        out = [parsed["default"]] * n_assets
    for name, rows in parsed.items():
        if name == "default" or assets is None:
            continue
        if name not in assets:
            raise _err(f"{TIERS_KEY}.{name}", f"unknown asset {name!r} (known: {', '.join(assets)})")
        out[assets.index(name)] = rows
    return out


def params_from_config(
    cfg: dict,
    inst: Instruments,
    haircut: np.ndarray,
    overrides: tuple[np.ndarray, np.ndarray],
    *,
    assets: tuple[str, ...] | None = None,
) -> Params:
    """Resolve ``[margin]`` defaults, tiers, portfolio parameters and the per-instrument
    ``im_rate``/``mm_rate`` columns into ``Params``.

    Args:
      cfg: the ``[margin]`` table as parsed from TOML.
      inst: instrument terms ``[I]``. haircut: ``[A]``.
      overrides: ``(im_rate, mm_rate)`` columns of the instruments table, ``[I]`` each, NaN
        where not given; a given rate replaces the instrument's default rate and its tiers.
      assets: the snapshot's asset names ``[A]``; per-asset tables (``{BTC = 0.16}``) are
        applied only when they are known (``resolve`` does it for a loaded snapshot).

    Raises:
      InputError: naming ``exchange.toml``, ``[margin]`` and the key at fault.
    """
    known = (*DEFAULTS, TIERS_KEY, *PORTFOLIO_DEFAULTS, *VAR_DEFAULTS, *HAIRCUT_DEFAULTS)
    unknown = set(cfg) - set(known)
    if unknown:
        key = min(unknown)
        raise _err(key, f"unknown key (known: {', '.join(known)})")
    values = {**DEFAULTS, **{k: v for k, v in cfg.items() if k in DEFAULTS}}
    if values["model"] not in MODELS:
        raise _err("model", f"{values['model']!r} is not one of {MODELS}")
    var_config(cfg, require_history=values["model"] == "var")
    for key, v in values.items():
        if key == "model":
            continue
        if not _is_number(v) or not math.isfinite(v) or v < 0:
            raise _err(key, f"{v!r} must be a number >= 0")
    # maintenance above initial margin would make an account liquidatable as it opens (the
    # tiers are held to the same rule); an option's IM rate is at least its floor
    for mm_key, im_key in (("future_mm_rate", "future_im_rate"), ("option_mm_rate", "option_im_floor")):
        if values[mm_key] > values[im_key]:
            raise _err(mm_key, f"{values[mm_key]:g} must not exceed {im_key} ({values[im_key]:g})")

    n_assets = len(haircut)
    kind = np.asarray(inst.kind)
    is_opt = kind == OPTION
    im_over, mm_over = (np.asarray(o, dtype=np.float64) for o in overrides)

    # Risk-limit tiers per underlying, padded to K rows (bound inf, last rates).
    per_asset_tiers = _tiers(cfg.get(TIERS_KEY), assets, n_assets, (values["future_im_rate"], values["future_mm_rate"]))
    K = max(len(t) for t in per_asset_tiers) if per_asset_tiers else 1
    table = np.empty((max(n_assets, 1), K, 3))
    for a, rows in enumerate(per_asset_tiers):  # a loop over assets (a handful), not positions
        table[a, : len(rows)] = rows
        table[a, len(rows):] = [math.inf, rows[-1, 1], rows[-1, 2]]
    und = np.asarray(inst.underlying)
    bound, tier_im, tier_mm = (table[und, :, j] for j in range(3))
    opt_col = is_opt[:, None]
    bound = np.where(opt_col, math.inf, bound)
    tier_im = np.where(opt_col, values["option_im_rate"], tier_im)
    tier_mm = np.where(opt_col, values["option_mm_rate"], tier_mm)
    tier_im = np.where(np.isnan(im_over)[:, None], tier_im, im_over[:, None])
    tier_mm = np.where(np.isnan(mm_over)[:, None], tier_mm, mm_over[:, None])

    # Portfolio parameters.
    pm = {k: cfg.get(k) for k in PORTFOLIO_DEFAULTS}
    scalar = {k: (PORTFOLIO_DEFAULTS[k] if pm[k] is None else pm[k]) for k in PORTFOLIO_DEFAULTS}
    fields: dict[str, Any] = {}
    for key, (field, lo, hi, lo_inc) in _PER_ASSET.items():
        check = functools.partial(_checked, lo=lo, hi=hi, lo_inclusive=lo_inc)
        fields[field] = _per_asset(key, pm[key], PORTFOLIO_DEFAULTS[key], assets, n_assets, check)
    buckets = scalar["buckets_count"]
    if isinstance(buckets, bool) or not isinstance(buckets, int) or not 1 <= buckets <= 50:
        raise _err("buckets_count", f"{buckets!r} must be a whole number from 1 to 50")
    moves = scalar["extended_moves"]
    if not isinstance(moves, list) or not moves:
        raise _err("extended_moves", "must be a non-empty list of relative price moves, e.g. [-0.66, 0.5]")
    moves = [_checked("extended_moves", v, -1.0, math.inf, False) for v in moves]
    mm_factor = _checked("mm_factor", scalar["mm_factor"], 0.0, 1.0, False)
    min_days = _checked("min_dte_days", scalar["min_dte_days"], 0.0, 365.0, False)

    return Params(
        **_haircut_fields(cfg, inst, np.asarray(haircut, dtype=np.float64), assets),
        im_rate=tier_im[:, 0],
        mm_rate=tier_mm[:, 0],
        option_im_floor=np.float64(values["option_im_floor"]),
        im_override=im_over,
        mm_override=mm_over,
        tier_bound=bound,
        tier_im=tier_im,
        tier_mm=tier_mm,
        **fields,
        pm_extended_moves=np.asarray(moves, dtype=np.float64),
        pm_mm_factor=np.float64(mm_factor),
        pm_min_dte_days=np.float64(min_days),
        pm_buckets=int(buckets),
    )


def _median_option_vol(inst: Instruments, n_assets: int) -> np.ndarray:
    """``[A]``: the median ``mark_iv`` of the options on each asset, 0 for assets without any."""
    und, iv = np.asarray(inst.underlying), np.asarray(inst.iv, dtype=np.float64)
    opt = np.asarray(inst.kind) == OPTION
    return np.array([np.median(iv[opt & (und == a)]) if (opt & (und == a)).any() else 0.0 for a in range(n_assets)])


def _haircut_fields(cfg: dict, inst: Instruments, haircut: np.ndarray, assets: tuple[str, ...] | None) -> dict:
    """``Params``' haircut fields from ``[margin]``'s ``haircut_*`` keys (``HAIRCUT_DEFAULTS``)."""
    c = {**HAIRCUT_DEFAULTS, **{k: v for k, v in cfg.items() if k in HAIRCUT_DEFAULTS}}
    if c["haircut_model"] not in HAIRCUT_MODELS:
        raise _err("haircut_model", f"{c['haircut_model']!r} is not one of {HAIRCUT_MODELS}")
    n_assets = len(haircut)
    derived = _median_option_vol(inst, n_assets)
    builtin_vol = {"default": 0.0, **({a: float(v) for a, v in zip(assets, derived)} if assets else {})}
    per = {
        "haircut_reference_vol": (builtin_vol, functools.partial(_checked, lo=0.0, hi=5.0)),
        "haircut_daily_volume": (0.0, functools.partial(_checked, lo=0.0, hi=math.inf)),
        "haircut_concentration": (0.1, functools.partial(_checked, lo=0.0, hi=10.0)),
    }
    vol, volume, conc = (_per_asset(k, cfg.get(k), builtin, assets, n_assets, check) for k, (builtin, check) in per.items())
    cap = _checked("haircut_max", c["haircut_max"], 0.0, 1.0, False)
    if cap >= 1.0:
        raise _err("haircut_max", f"{cap!r} must be below 1 (a haircut of 1 would make the asset worthless)")
    dynamic = c["haircut_model"] == "dynamic"
    if dynamic and n_assets and haircut.max() > cap:
        raise _err("haircut_max", f"{cap:g} is below the largest static haircut ({haircut.max():g})")
    off = np.zeros(n_assets)
    return {
        "haircut": haircut,
        "haircut_vol": vol if dynamic else off,
        "haircut_volume": volume if dynamic else off,
        "haircut_concentration": conc if dynamic else off,
        "haircut_max": np.float64(cap),
        "haircut_dynamic": bool(dynamic and (vol.any() or (volume > 0).any())),
    }


def require_per_contract(snap: Any, command: str, models: tuple[str, ...] = ("standard",), tiers: bool = False,
                         dynamic: bool = False) -> None:
    """Raise ``InputError`` where ``command``, which margins with ``per_contract`` (the standard
    model, untiered unless ``tiers``; or the other ``models`` it names) and static haircuts
    (unless ``dynamic``), would answer for another exchange than ``snap``'s: another margin
    model, risk-limit tiers under the standard model, or dynamic haircuts. An answer for
    another exchange would be worse than none."""
    if snap.params.haircut_dynamic and not dynamic:
        raise _err("haircut_model", f"{command} models static haircuts only; use stress run for dynamic haircuts")
    model = snap.margin_config.get("model", "standard")
    if model not in models:
        raise _err("model", f"{command} models the {' and '.join(models)} margin model{'s' * (len(models) > 1)} "
                   f"only, not {model!r}; use stress run to test a trade")
    if model == "standard" and not tiers and np.isfinite(np.asarray(snap.params.tier_bound)).any():
        raise _err(TIERS_KEY, f"{command} models untiered margin only; use stress run to test a trade under risk-limit tiers")


def scaled_haircut(params: Params, vol_shift: Any, asset: Any = slice(None)) -> Any:
    """Haircut of ``asset`` (default: every asset, ``[..., A]``) at states where its implied
    vol moved by ``vol_shift`` (annualised, absolute): ``h * max(1, (v + dv) / v)`` against its
    reference vol ``v``, and ``h`` where ``v = 0``. Never below ``h``: a calm scenario does not
    release collateral (the anti-procyclical intent of EMIR RTS 153/2013 art. 28 and 41)."""
    h, v = params.haircut[asset], params.haircut_vol[asset]
    # h * max(1, (v + dv) / v), written so that at dv = 0 (the snapshot, a state without a vol
    # shift) autodiff takes the side of a vol rise, not half of it
    rise = jnp.where(vol_shift >= 0, vol_shift, 0.0)
    return jnp.where(v > 0, h + h * rise / jnp.where(v > 0, v, 1.0), h)


def unit_share(params: Params, price0: Any) -> Any:
    """``[A]``: ``P0 / V``, the share of a day's volume one unit of each asset is (USD per unit
    at the snapshot over USD traded per day); 0 where no daily volume is given."""
    V = jnp.asarray(params.haircut_volume)
    return jnp.where(V > 0, jnp.asarray(price0) / jnp.where(V > 0, V, 1.0), 0.0)


def haircut_at(params: Params, asset: Any, net: Any, vol_shift: Any, price0: Any) -> Any:
    """The haircut of ``asset`` on a holding of ``net`` units (broadcasting) at a state where
    its vol moved by ``vol_shift``, with asset prices ``price0`` ``[A]`` at the snapshot:

    ``h' = min(h_max, scaled_haircut + c * sqrt(max(net, 0) * P0 / V))``,

    a concentration add-on on the USD held (at the snapshot price, so it measures quantity)
    against the USD traded per day ``V``: the square root of size of FTX's IMF factors and of
    the square-root impact law, a continuous form of the amount tiers of Binance, Bybit and
    OKX. ``V = 0``: no add-on. One formula with the engine's: ``portfolio.keep_share``.
    """
    hc = Haircut(base=jnp.asarray(scaled_haircut(params, vol_shift, asset))[..., None],
                 coef=params.haircut_concentration[asset], share=unit_share(params, price0)[asset],
                 cap=params.haircut_max)
    return 1.0 - keep_share(hc, None, jnp.asarray(net)[..., None])[..., 0]


def snapshot_haircut(params: Params, price0: Any, dtype: Any = jnp.float64) -> Any:
    """The haircuts the engine starts from: ``[A]`` when static; for dynamic haircuts a
    ``Haircut`` at the snapshot (``base`` ``[A, 1]`` = ``h``, no vol shift yet), whose ``base``
    each scenario tile replaces with its vol-scaled haircuts (``scaled_haircut``)."""
    if not params.haircut_dynamic:
        return jnp.asarray(params.haircut, dtype)
    as_dt = lambda x: jnp.asarray(x, dtype)  # noqa: E731
    return Haircut(base=as_dt(params.haircut)[:, None], coef=as_dt(params.haircut_concentration),
                   share=as_dt(unit_share(params, price0)), cap=as_dt(params.haircut_max))


def var_config(cfg: dict, require_history: bool = False) -> dict:
    """The ``var`` model's ``[margin]`` keys with defaults, checked (see ``VAR_DEFAULTS``)."""
    c = {**VAR_DEFAULTS, **{k: v for k, v in cfg.items() if k in VAR_DEFAULTS}}
    if c["var_history"] is None:
        if require_history:
            raise _err("var_history", "the var model needs a price history: var_history = \"history.csv\"")
    elif not isinstance(c["var_history"], str) or not c["var_history"].strip():
        raise _err("var_history", f"{c['var_history']!r} must be a file name")
    if not isinstance(c["var_filtered"], bool):
        raise _err("var_filtered", f"{c['var_filtered']!r} must be true or false")
    c["var_horizon_days"] = _checked("var_horizon_days", c["var_horizon_days"], 0.0, 365.0, False)
    c["confidence"] = _checked("confidence", c["confidence"], 0.5, 0.9999)
    c["var_lambda"] = _checked("var_lambda", c["var_lambda"], 0.0, 0.9999, False)
    c["var_floor"] = _checked("var_floor", c["var_floor"], 0.0, 10.0)
    w = c["var_min_windows"]
    if isinstance(w, bool) or not isinstance(w, int) or w < 1:
        raise _err("var_min_windows", f"{w!r} must be a whole number >= 1")
    return c


def idle_keys(cfg: dict) -> list[str]:
    """``[margin]`` keys given that the configured model does not use: the portfolio model's
    under the standard model, the standard rates and tiers under the portfolio model,
    ``future_mm_rate`` under the var model (its floor takes the initial rates; a short
    option's standard initial margin is at least its maintenance margin, so ``option_mm_rate``
    counts there). Not an error: one table may hold several models' keys for ``--model``, but
    a key that changes nothing should be said to."""
    model = cfg.get("model", "standard")
    common = {"model", "confidence"} | set(HAIRCUT_DEFAULTS)  # confidence: backtest's default level too
    standard = set(DEFAULTS) | {TIERS_KEY}
    used = {"standard": standard,
            "portfolio": set(PORTFOLIO_DEFAULTS),
            "var": (standard - {"future_mm_rate"}) | set(VAR_DEFAULTS) | {"mm_factor"}}[model]
    return sorted(k for k in cfg if k not in used | common)


def mm_above_initial(params: Params, kind: Any) -> np.ndarray:
    """``[I]`` bool: instruments whose maintenance rate passes their initial rate, which would
    make a position liquidatable as it opens. A future's IM rate is its tier's ``im_rate``; an
    option's is ``max(im_rate - OTM/S, option_im_floor)``, at least the floor, so its
    maintenance rate is held to the floor."""
    tier_im, tier_mm = np.asarray(params.tier_im), np.asarray(params.tier_mm)
    return np.where(np.asarray(kind) == OPTION, tier_mm[:, 0] > float(params.option_im_floor),
                    (tier_mm > tier_im).any(axis=1))


def resolve(snap: Any) -> Params:
    """The snapshot's ``Params`` with its ``[margin]`` table resolved against its asset names
    (per-asset tables such as ``price_range = {BTC = 0.16, ETH = 0.20}``): what loading does,
    again, for a snapshot whose table was changed in Python. The engine and ``account_margin``
    read ``snap.params``, so such a snapshot needs ``params=resolve(it)`` too."""
    p = snap.params
    return params_from_config(snap.margin_config, snap.instruments, p.haircut, (p.im_override, p.mm_override),
                              assets=tuple(snap.assets))


# --------------------------------------------------------------------------------------------
# Standard model


def position_weight(kind: Any, quantity: Any, xp: Any = jnp) -> Any:
    """How many contracts of a position carry the per-contract requirement (``xp``: ``numpy``
    for host arrays, such as the engine's holdings layout)."""
    return xp.where(kind == OPTION, xp.maximum(-quantity, 0.0), xp.abs(quantity))


def per_contract(inst: Instruments, params: Params, spot: Any, value: Any, live: Any = True) -> tuple[Any, Any]:
    """Initial and maintenance margin per contract, USD, standard model, untiered.

    Futures and perpetuals pay ``im_rate``/``mm_rate`` (the first risk-limit tier when tiers
    are configured; ``tier_margin`` applies the tier of a whole position).

    Args:
      inst: instrument terms ``[I]``.
      params: risk parameters.
      spot: ``[I, S]`` price of each instrument's underlying, USD.
      value: ``[I, S]`` option value per coin of underlying, USD (ignored for futures).
      live: ``[I, S]`` bool, ``pricing.revalue``'s: where False the scenario's horizon has
        reached the expiry, the contract has settled, and it needs no margin (an exchange
        settles expired options and futures into cash: margining the intrinsic value that
        equity already holds would count it twice).

    Returns:
      ``(im, mm)``, each ``[I, S]``, USD per contract of weight ``position_weight``.
    """
    c = inst.contract_size[:, None]
    is_opt = (inst.kind == OPTION)[:, None]
    is_call = inst.is_call[:, None]
    im_rate, mm_rate = params.im_rate[:, None], params.mm_rate[:, None]

    notional = jnp.where(inst.inverse[:, None], c, c * spot)
    fut_im, fut_mm = im_rate * notional, mm_rate * notional

    k = inst.strike[:, None]
    otm = jnp.where(is_call, jnp.maximum(k - spot, 0.0), jnp.maximum(spot - k, 0.0))
    opt_mm = c * (jnp.where(is_call, mm_rate * spot, jnp.maximum(mm_rate * spot, mm_rate * value)) + value)
    opt_im = c * (jnp.maximum(im_rate - otm / spot, params.option_im_floor) * spot + value)
    opt_im = jnp.where(is_call, opt_im, jnp.maximum(opt_im, opt_mm))
    return (jnp.where(live, jnp.where(is_opt, opt_im, fut_im), 0.0),
            jnp.where(live, jnp.where(is_opt, opt_mm, fut_mm), 0.0))


def tier_margin(notional: Any, bound: Any, im_rate: Any, mm_rate: Any) -> tuple[Any, Any]:
    """Initial and maintenance margin of positions under risk-limit tiers, USD.

    The whole position pays the rates of the tier its notional falls in (Bybit's risk limit,
    Binance's position brackets): tier ``k`` covers ``bound[k-1] < notional <= bound[k]``;
    beyond the last bound the last tier applies. Rates rise with the tier, so the requirement
    is monotone in the notional (with a jump at each bound).

    Args:
      notional: ``[...]`` position notional, USD (>= 0).
      bound: ``[..., K]`` ascending USD bounds of the position's tiers.
      im_rate, mm_rate: ``[..., K]`` rates of notional in each tier.

    Returns:
      ``(im, mm)``, each shaped like ``notional``, USD.

    Example:
      With tiers ``[[50_000, 0.008, 0.004], [250_000, 0.01, 0.005]]`` a 100,000 USD position
      is in tier 2: IM = 1,000, MM = 500.
    """
    tier = jnp.sum(notional[..., None] > bound[..., :-1], axis=-1)
    pick = lambda r: jnp.take_along_axis(r, tier[..., None], axis=-1)[..., 0]
    return pick(im_rate) * notional, pick(mm_rate) * notional


def face_valued(inst: Instruments, xp: Any = jnp) -> Any:
    """``[I]`` bool: the contract's notional is its fixed USD face value ``c`` (inverse futures
    and perpetuals), not ``c * S`` (SPEC section 2). ``xp``: ``jnp``, or ``np`` on the host."""
    return xp.asarray(inst.inverse) & (xp.asarray(inst.kind) != OPTION)


def contract_notional(inst: Instruments, spot: Any, live: Any = True) -> Any:
    """``[I, S]`` USD notional per contract (SPEC section 2): ``c`` where ``face_valued``,
    ``c * S`` otherwise, at underlying prices ``spot`` ``[I, S]``; 0 where not ``live``
    (``pricing.revalue``): a settled contract is not closed out, so it pays no fee, price
    impact or risk-limit tier."""
    c = inst.contract_size[:, None]
    return jnp.where(live, jnp.where(face_valued(inst)[:, None], c, c * spot), 0.0)


def position_notional(inst: Instruments, pos_inst: Any, qty: Any, spot: Any, xp: Any = jnp) -> Any:
    """``[N]`` USD notional of positions (SPEC section 2): ``|q| * c`` for inverse futures and
    perpetuals (face value), ``|q| * c * S`` otherwise; ``spot`` is ``[I]``. ``xp``: ``jnp``,
    or ``np`` on the host (no eager device operations to compile)."""
    c = xp.asarray(inst.contract_size)[pos_inst]
    return xp.abs(qty) * xp.where(face_valued(inst, xp)[pos_inst], c, c * spot[pos_inst])


def standard_position_margin(inst: Instruments, params: Params, pos_inst: Any, qty: Any, spot: Any,
                             option: Any) -> tuple[Any, Any]:
    """Standard-model IM and MM of each position, USD, risk-limit tiers applied.

    Args:
      inst, params: instruments ``[I]`` and parameters.
      pos_inst: ``[N]`` instrument index. qty: ``[N]`` contracts, signed.
      spot: ``[I]`` underlying price, USD. option: ``[I]`` option value per coin, USD.

    Returns:
      ``(im, mm)``, each ``[N]``, USD.
    """
    im_pc, mm_pc = per_contract(inst, params, spot[:, None], option[:, None])
    w = position_weight(inst.kind[pos_inst], qty)
    notional = position_notional(inst, pos_inst, qty, spot)
    f_im, f_mm = tier_margin(notional, params.tier_bound[pos_inst], params.tier_im[pos_inst], params.tier_mm[pos_inst])
    is_opt = inst.kind[pos_inst] == OPTION
    return jnp.where(is_opt, w * im_pc[pos_inst, 0], f_im), jnp.where(is_opt, w * mm_pc[pos_inst, 0], f_mm)


# --------------------------------------------------------------------------------------------
# Portfolio model: the risk matrix


def vol_scenarios(inst: Instruments, params: Params) -> Any:
    """``[3, I]`` shocked implied vols of each option: up, unchanged, down.

    Deribit's DTE-dependent shock, with ``x = (30 / DTE) ** p`` (``p`` the short-term vega
    power below 30 days to expiry, the long-term one from 30 days; DTE floored at
    ``min_dte_days``): ``up = max(iv * (1 + range_up * x), min_vol_for_shock_up)``,
    ``down = max(iv * (1 - range_down * x), 0.01)``. Parameters of the option's underlying.
    """
    u = inst.underlying
    is_opt = inst.kind == OPTION
    # futures and perpetuals (dte inf) keep their iv; 30 days for them keeps 0 ** power (whose
    # derivative in the power is 0 * log 0) out of gradients
    dte = jnp.where(is_opt, jnp.maximum(inst.expiry * YEAR_DAYS, params.pm_min_dte_days), 30.0)
    power = jnp.where(dte < 30.0, params.pm_short_vega_power[u], params.pm_long_vega_power[u])
    x = (30.0 / dte) ** power
    up = jnp.maximum(inst.iv * (1.0 + params.pm_vol_up[u] * x), params.pm_min_vol_up[u])
    down = floor_vol(inst.iv * (1.0 - params.pm_vol_down[u] * x), inst.iv)
    return jnp.stack([jnp.where(is_opt, up, inst.iv), inst.iv, jnp.where(is_opt, down, inst.iv)])


def grid_moves(params: Params) -> tuple[Any, Any, Any]:
    """The risk matrix's grid, ``G = 3 * (2 * buckets + 1) + E`` points.

    Point ``g = 3 * p + v`` of the standard table moves every asset by
    ``price_range * (p - buckets) / buckets`` under vol scenario ``v`` (up, unchanged, down);
    the ``E`` extended points that follow move every asset by ``extended_moves[e]`` on vol up.

    Returns:
      ``(spot_mult [G, A], vol_index [G] int, extended [G] bool)``.
    """
    B = params.pm_buckets
    steps = jnp.arange(-B, B + 1) / B  # [P]
    std = 1.0 + steps[:, None] * params.pm_price_range[None, :]  # [P, A]
    std = jnp.repeat(std, 3, axis=0)  # [3P, A], vol fastest
    ext = jnp.broadcast_to(1.0 + params.pm_extended_moves[:, None], (params.pm_extended_moves.shape[0], std.shape[1]))
    P, E = 2 * B + 1, params.pm_extended_moves.shape[0]
    vol_index = jnp.concatenate([jnp.tile(jnp.arange(3), P), jnp.zeros(E, int)])
    extended = jnp.concatenate([jnp.zeros(3 * P, bool), jnp.ones(E, bool)])
    return jnp.concatenate([std, ext]), vol_index, extended


def _usd_value(inst: Instruments, market: Market, spot_mult: Any, iv: Any) -> Any:
    """``[I, G]`` USD value per contract: settlement units times the settlement asset's price,
    the grid's price for coin-settled (inverse) instruments, today's price for the others
    (the risk matrix moves the underlying only). An instrument past its expiry (``inst`` of a
    scenario state beyond it, ``shifted``) has settled into a fixed amount of its settlement
    asset, its value at today's prices: the grid moves only that amount's price."""
    G, A = spot_mult.shape
    inst = dataclasses.replace(inst, iv=iv)
    rv = revalue(inst, market, spot_mult, jnp.zeros((G, A)), jnp.zeros(G))
    settled = revalue(inst, market, jnp.ones((1, A)), jnp.zeros((1, A)), jnp.zeros(1))["value"]  # [I, 1]
    conv = jnp.where(inst.inverse[:, None], rv["spot"], market.price[inst.settlement][:, None])
    return jnp.where(rv["live"], rv["value"], settled) * conv


@jax.jit
def instrument_grid(inst: Instruments, market: Market, params: Params) -> dict:
    """Revalue every instrument once per grid point of the risk matrix.

    Returns:
      ``pnl [I, G]``: USD value change per contract at each grid point (inverse: the
      position's coins at the grid's coin price minus its coins at today's price);
      ``delta [I]``: USD delta per contract, ``dV_usd/dS * S``; ``roll [I]``: USD roll shock
      per contract, ``n * max(min_annualised_move, annualised_move_risk * T)`` for futures
      (``T`` years to expiry, 0 for perpetuals), 0 for options and settled futures; ``extended [G]``, ``vol_index
      [G]``, ``spot_mult [G, A]`` from ``grid_moves``.
    """
    spot_mult, vol_index, extended = grid_moves(params)
    A = spot_mult.shape[1]
    ivs = vol_scenarios(inst, params)  # [3, I]
    base = _usd_value(inst, market, jnp.ones((1, A)), inst.iv)[:, 0]  # [I]
    by_vol = jax.vmap(lambda iv: _usd_value(inst, market, spot_mult, iv))(ivs)  # [3, I, G]
    value = jnp.take_along_axis(by_vol, vol_index[None, None, :], axis=0)[0]  # [I, G]
    # USD delta: move every asset by the same factor (only the underlying enters a value).
    _, delta = jax.jvp(lambda t: _usd_value(inst, market, jnp.full((1, A), t), inst.iv)[:, 0], (1.0,), (1.0,))
    u = inst.underlying
    T = jnp.where(inst.kind == PERPETUAL, 0.0, jnp.where(jnp.isfinite(inst.expiry), inst.expiry, 0.0))
    notional = jnp.where(inst.inverse, inst.contract_size, inst.contract_size * market.price[u])
    move = jnp.maximum(params.pm_min_move[u], params.pm_move_risk[u] * T)
    roll = jnp.where((inst.kind == OPTION) | (inst.expiry <= 0), 0.0, notional * move)  # settled: no roll
    return {"pnl": value - base[:, None], "delta": delta, "roll": roll, "extended": extended,
            "vol_index": vol_index, "spot_mult": spot_mult}


def shifted(inst: Instruments, market: Market, spot_mult: Any, vol_shift: Any, horizon_days: Any) -> tuple[Instruments, Market]:
    """The instruments and market *of one scenario state*, to build a risk matrix around it:
    asset prices ``price * spot_mult`` (``[A]``), futures marks moved with their underlying,
    option vols shifted by ``vol_shift`` (``[A]``, floored as in ``pricing.revalue``), and
    ``horizon_days`` passed. ``revalue`` of the result at no move equals ``revalue`` of the
    snapshot at the scenario."""
    u = inst.underlying
    is_opt = inst.kind == OPTION
    inst = dataclasses.replace(
        inst,
        mark=inst.mark * spot_mult[u],
        iv=jnp.where(is_opt, floor_vol(inst.iv + vol_shift[u], inst.iv), inst.iv),
        expiry=inst.expiry - horizon_days / YEAR_DAYS,
    )
    return inst, dataclasses.replace(market, price=market.price * spot_mult)


@functools.partial(jax.jit, static_argnames=("batch",))
def scenario_grids(inst: Instruments, market: Market, params: Params, spot_mult: Any, vol_shift: Any,
                   horizon_days: Any, batch: int = 0) -> dict:
    """``instrument_grid`` around each of ``X`` scenario states (``spot_mult``, ``vol_shift``
    ``[X, A]``, ``horizon_days`` ``[X]``): ``pnl [X, I, G]``, ``delta [X, I]``, ``roll [X, I]``
    (the portfolio model's margin under stress: revalued once per (scenario, grid point)).

    ``batch > 0`` revalues ``batch`` states at a time and recomputes them in reverse mode
    (``jax.checkpoint``), so a gradient keeps one batch's intermediates, not every state's."""
    def one(state):
        g = instrument_grid(*shifted(inst, market, *state), params)
        return {"pnl": g["pnl"], "delta": g["delta"], "roll": g["roll"]}

    return _each_state(one, (spot_mult, vol_shift, horizon_days), batch)


def _each_state(one: Any, states: tuple, batch: int) -> Any:
    """``one`` over the leading axis of ``states``: ``batch`` states at a time, recomputed in
    reverse mode (``jax.checkpoint``), or all at once (``batch`` 0)."""
    if batch:
        return jax.lax.map(jax.checkpoint(one), states, batch_size=batch)
    return jax.vmap(one)(states)


def risk_matrix_margin(pnl: Any, extended: Any, extended_fraction: Any, tau: Any = None) -> tuple[Any, Any]:
    """Worst loss over a risk matrix.

    Args:
      pnl: ``[K, G]`` P&L of each block (account and underlying) at each grid point, USD.
      extended: ``[G]`` True at extended-table points, whose P&L counts at ``extended_fraction``.
      extended_fraction: ``[K]``.
      tau: None, or a smoothing width, USD: the maximum (0 included) becomes a
        ``tau``-log-sum-exp, at most ``tau * log(G + 1)`` above it (``greeks.hedge``'s search).

    Returns:
      ``(margin [K], worst [K])``: ``max(0, max_g -counted P&L)`` and the grid point that
      drives it (the first on ties).
    """
    loss = -jnp.where(extended[None, :], extended_fraction[:, None] * pnl, pnl)
    worst = jnp.argmax(loss, axis=1)
    if tau is not None:
        floor = jnp.zeros_like(loss[:, :1])
        return tau * jax.nn.logsumexp(jnp.concatenate([loss, floor], axis=1) / tau, axis=1), worst
    return jnp.maximum(jnp.max(loss, axis=1), 0.0), worst


def soft_relu(x: Any, tau: Any = None) -> Any:
    """``max(x, 0)``, or with a width ``tau`` (same units as ``x``) the smooth
    ``(x + sqrt(x^2 + tau^2)) / 2``, within ``tau / 2`` of it."""
    return jnp.maximum(x, 0.0) if tau is None else 0.5 * (x + jnp.sqrt(x * x + tau * tau))


@functools.partial(jax.jit, static_argnames=("n_sub", "n_block"))
def portfolio_requirements(
    pos_pnl: Any, pos_delta: Any, pos_roll: Any, pos_sub: Any, sub_block: Any, sub_offset: Any,
    block_fraction: Any, block_max_delta_shock: Any, block_threshold: Any, mm_factor: Any,
    extended: Any, tau: Any = None, *, n_sub: int, n_block: int,
) -> dict:
    """Portfolio-margin requirements per block (account and underlying) from position P&L.

    Positions are summed into *sub-blocks* (account, underlying, settlement asset), whose gains
    count at their settlement asset's ``pnl_offset`` when netted into the block (losses count in
    full), then the block's requirement is its worst loss plus add-ons. Pure and jittable:
    the engine can call it per scenario with the grid P&L around that scenario.

    Args:
      pos_pnl: ``[N, G]`` position P&L at each grid point, USD (``qty * pnl per contract``).
      pos_delta: ``[N]`` USD delta. pos_roll: ``[N]`` roll shock, USD (``|qty| * roll``).
      pos_sub: ``[N]`` sub-block of each position. sub_block: ``[M]`` block of each sub-block.
      sub_offset: ``[M]`` pnl_offset of the sub-block's settlement asset.
      block_fraction, block_max_delta_shock, block_threshold: ``[K]`` parameters of the block's
        underlying. mm_factor: ``[]``. extended: ``[G]`` extended-table mask.
      tau: None (exact), or a smoothing width, USD, for a search over positions (``greeks``'
        hedge): every kink (the offset of gains, the worst grid point, the delta shock's
        threshold) smoothed within about ``tau``. ``worst`` stays the exact one.
      n_sub, n_block: ``M`` and ``K`` (static).

    Returns:
      ``[K]`` arrays: ``risk_matrix`` (worst counted loss), ``worst`` (grid index),
      ``roll_shock``, ``net_delta`` (USD), ``delta_shock``
      (``max_delta_shock * max(|net_delta| - threshold, 0)``), ``initial_margin`` (their sum)
      and ``maintenance_margin`` (``mm_factor * initial_margin``).
    """
    sub_pnl = jax.ops.segment_sum(pos_pnl, pos_sub, num_segments=n_sub)
    if tau is None:
        counted = jnp.where(sub_pnl > 0, sub_offset[:, None] * sub_pnl, sub_pnl)
    else:  # gains at the offset: pnl - (1 - offset) max(pnl, 0)
        counted = sub_pnl - (1.0 - sub_offset[:, None]) * soft_relu(sub_pnl, tau)
    block_pnl = jax.ops.segment_sum(counted, sub_block, num_segments=n_block)
    rm, worst = risk_matrix_margin(block_pnl, extended, block_fraction, tau)
    pos_block = sub_block[pos_sub]
    roll = jax.ops.segment_sum(pos_roll, pos_block, num_segments=n_block)
    delta = jax.ops.segment_sum(pos_delta, pos_block, num_segments=n_block)
    size = jnp.abs(delta) if tau is None else jnp.sqrt(delta * delta + tau * tau)
    delta_shock = block_max_delta_shock * soft_relu(size - block_threshold, tau)
    im = rm + roll + delta_shock
    return {"risk_matrix": rm, "worst": worst, "roll_shock": roll, "net_delta": delta,
            "delta_shock": delta_shock, "initial_margin": im, "maintenance_margin": mm_factor * im}


# --------------------------------------------------------------------------------------------
# Per-account margin at the snapshot


def grid_labels(assets: tuple[str, ...], spot_mult: np.ndarray, vol_index: np.ndarray,
                extended: np.ndarray) -> np.ndarray:
    """``[A, G]`` names of the grid points, e.g. ``"BTC -16% vol up"`` (a few hundred strings,
    formatted once, then gathered per block)."""
    vol = np.asarray(VOL_SCENARIOS)[vol_index]
    return np.array([[f"{a} {spot_mult[g, i] - 1:+.0%} vol {vol[g]}{' (extended)' if extended[g] else ''}"
                      for g in range(len(vol_index))] for i, a in enumerate(assets)], dtype=object)


def _groups(*keys: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Dense ids of the distinct key tuples (sorted) and the index of each group's first row."""
    if not len(keys[0]):
        return np.zeros(0, np.int64), np.zeros(0, np.int64)
    key = keys[0].astype(np.int64)
    for k in keys[1:]:
        key = key * (int(k.max()) + 1) + k
    # a stable sort in place of np.unique(key, return_index=True, return_inverse=True), about
    # 5x slower at 1.5M positions with numpy 2.4
    order = np.argsort(key, kind="stable")
    ranked = key[order]
    lead = np.r_[True, ranked[1:] != ranked[:-1]]
    inverse = np.empty(len(key), np.int64)
    inverse[order] = np.cumsum(lead) - 1
    return inverse, order[lead]  # stable: each group's first row in row order


@jax.jit
def _at_snapshot(inst: Instruments, market: Market) -> dict:
    """``revalue`` at the unshocked market (``[I, 1]`` and ``[A, 1]`` arrays)."""
    A = market.price.shape[0]
    return revalue(inst, market, jnp.ones((1, A)), jnp.zeros((1, A)), jnp.zeros(1))


def net_amounts(snap: Any, value0: np.ndarray) -> np.ndarray:
    """``[n, A]`` net amount of each asset per account at the snapshot, in the asset's units:
    its balance plus the value of the positions settled in it (``value0`` ``[I]`` per contract)."""
    n, A = snap.balances.shape
    settle = np.asarray(snap.instruments.settlement)[snap.pos_instrument]
    held = np.bincount(snap.pos_account.astype(np.int64) * A + settle,
                       weights=snap.pos_quantity * value0[snap.pos_instrument], minlength=n * A).reshape(n, A)
    return snap.balances + held


# account_margin's steps over every position or account, each one executable: run operation by
# operation they compiled one eager executable per operation and array shape, so a new
# snapshot size cost dozens of compilations (67 in a first `stress margin` at 1M accounts)
_position_margin = jax.jit(standard_position_margin)
_haircut_at = jax.jit(haircut_at)


def _collateral(snap: Any, value0: np.ndarray) -> tuple[np.ndarray, np.ndarray]:
    """Equity and collateral value per account at the snapshot, USD (SPEC section 2)."""
    n, A = snap.balances.shape
    e = net_amounts(snap, value0)
    usd = e * np.asarray(snap.market.price)[None, :]
    price0 = np.asarray(snap.market.price)
    haircut = np.asarray(_haircut_at(snap.params, np.arange(A), e, 0.0, price0)) if A else np.zeros((n, 0))
    return usd.sum(axis=1), np.where(e > 0, usd * (1.0 - haircut), usd).sum(axis=1)


def account_margin(snap: Any, model: str | None = None) -> dict:
    """Initial and maintenance margin of every account at the snapshot, USD.

    Args:
      snap: a loaded snapshot.
      model: ``"standard"`` or ``"portfolio"``; default ``[margin] model``.

    Returns:
      A dict: ``model``; ``accounts``, a DataFrame with one row per account (``account_id``,
      ``initial_margin``, ``maintenance_margin``, ``equity``, ``collateral_value``,
      ``liquidatable``, and the driving ``underlying`` and ``grid_point`` — the block with the
      largest requirement and its worst grid point, portfolio model only); ``underlyings``, a
      DataFrame with one row per account and underlying held (IM, MM and, for the portfolio
      model, ``risk_matrix_margin``, ``roll_shock``, ``delta_shock``, ``net_delta_usd``,
      ``grid_point``, ``price_move``, ``vol_scenario``, ``extended``).

    Raises:
      InputError: an unknown model, or a ``[margin]`` table that does not fit the snapshot.
    """
    import pandas as pd

    model = model or snap.margin_config.get("model", "standard")
    if model not in MODELS:
        raise InputError("--model", None, None, f"{model!r} is not one of {', '.join(MODELS)}")
    if model == "var":
        return _var_margin(snap)
    params = snap.params
    inst, market = snap.instruments, snap.market
    rv = _at_snapshot(inst, market)
    value0 = np.asarray(rv["value"])[:, 0]
    equity, collateral = _collateral(snap, value0)

    und = np.asarray(inst.underlying)[snap.pos_instrument]
    block, first = _groups(snap.pos_account, und)
    K = len(first)
    b_acc, b_und = snap.pos_account[first], und[first]
    n = snap.n_accounts
    names = np.asarray(snap.assets, dtype=object)

    blocks: dict[str, Any] = {"account_id": account_id_column(snap, b_acc), "underlying": names_at(snap.assets, b_und)}
    if model == "standard":
        im, mm = _position_margin(inst, params, snap.pos_instrument, snap.pos_quantity,
                                  np.asarray(rv["spot"])[:, 0], np.asarray(rv["option"])[:, 0])
        b_im = np.bincount(block, weights=np.asarray(im), minlength=K)
        b_mm = np.bincount(block, weights=np.asarray(mm), minlength=K)
        blocks.update(initial_margin=b_im, maintenance_margin=b_mm)
    else:
        grid = instrument_grid(inst, market, params)
        settle = np.asarray(inst.settlement)[snap.pos_instrument]
        sub, sub_first = _groups(snap.pos_account, und, settle)
        sub_block = block[sub_first]
        pi, q = snap.pos_instrument, snap.pos_quantity
        r = portfolio_requirements(
            q[:, None] * grid["pnl"][pi], q * grid["delta"][pi], np.abs(q) * grid["roll"][pi],
            sub, sub_block, params.pm_pnl_offset[settle[sub_first]],
            params.pm_extended_fraction[b_und], params.pm_max_delta_shock[b_und], params.pm_delta_threshold[b_und],
            params.pm_mm_factor, grid["extended"], n_sub=len(sub_first), n_block=K)
        r = {k: np.asarray(v) for k, v in r.items()}
        b_im, b_mm = r["initial_margin"], r["maintenance_margin"]
        worst = r["worst"]
        spot_mult = np.asarray(grid["spot_mult"])
        move = spot_mult[worst, b_und] - 1.0
        ext = np.asarray(grid["extended"])[worst]
        vol = np.asarray(VOL_SCENARIOS, dtype=object)[np.asarray(grid["vol_index"])[worst]]
        names_g = grid_labels(snap.assets, spot_mult, np.asarray(grid["vol_index"]), np.asarray(grid["extended"]))
        label = names_g[b_und, worst]
        blocks.update(initial_margin=b_im, maintenance_margin=b_mm, risk_matrix_margin=r["risk_matrix"],
                      roll_shock=r["roll_shock"], delta_shock=r["delta_shock"], net_delta_usd=r["net_delta"],
                      grid_point=label, price_move=move, vol_scenario=vol.astype(str), extended=ext)
    underlyings = pd.DataFrame(blocks)

    acc_im = np.bincount(b_acc, weights=b_im, minlength=n)
    acc_mm = np.bincount(b_acc, weights=b_mm, minlength=n)
    accounts = pd.DataFrame({
        "account_id": account_id_column(snap),
        "initial_margin": acc_im,
        "maintenance_margin": acc_mm,
        "equity": equity,
        "collateral_value": collateral,
        "liquidatable": collateral < acc_mm,
    })
    if model == "portfolio":
        # The driving block of each account: its largest MM (first underlying on ties).
        order = np.lexsort((b_und, -b_mm, b_acc))
        lead = order[np.r_[True, b_acc[order][1:] != b_acc[order][:-1]]] if K else order
        drive_u = np.full(n, None, dtype=object)
        drive_g = np.full(n, None, dtype=object)
        drive_u[b_acc[lead]] = names[b_und[lead]]
        drive_g[b_acc[lead]] = np.asarray(underlyings["grid_point"], dtype=object)[lead]
        accounts["underlying"] = drive_u
        accounts["grid_point"] = drive_g
    return {"model": model, "accounts": accounts, "underlyings": underlyings}


# --------------------------------------------------------------------------------------------
# The var model


def var_windows(snap: Any) -> tuple[dict, np.ndarray]:
    """The var model's settings (``var_config``) and its windows: ``[H, A]`` each asset's price
    at the window's end over its start (1 for assets the history has no column for)."""
    from pathlib import Path

    from . import replay
    from .scenarios import read_history

    c = var_config(snap.margin_config, require_history=True)
    path = Path(c["var_history"])
    path = path if path.is_absolute() else Path(snap.source) / path
    if not path.exists():
        raise _err("var_history", f"file not found: {path}")
    times, cols = read_history(path, snap.assets)
    used = [(snap.asset_index(k), k) for k in cols if k in snap.assets]
    if not used:
        raise InputError(path.name, None, None, f"no column names an asset of the snapshot ({', '.join(snap.assets)})")
    prices = np.stack([cols[k] for _, k in used], axis=1)
    starts, mult = replay.windows(times, prices, c["var_horizon_days"], filtered=c["var_filtered"], lam=c["var_lambda"])
    if len(starts) < c["var_min_windows"]:
        raise _err("var_history", f"{len(starts)} windows of {c['var_horizon_days']:g} days in {path.name}; "
                                  f"the var model needs at least var_min_windows = {c['var_min_windows']}")
    spot = np.ones((len(starts), snap.n_assets))
    spot[:, [a for a, _ in used]] = mult[:, -1]
    return c, spot


def var_grids(inst: Instruments, market: Market, spot_mult: Any, vol_shift: Any, horizon_days: Any,
              window_mult: Any, window_days: float, batch: int = 0) -> dict:
    """The var model's windows around each of ``X`` scenario states (``spot_mult``,
    ``vol_shift`` ``[X, A]``, ``horizon_days`` ``[X]``): each window ``w`` moves the state's
    asset prices by ``window_mult[w]`` (``[H, A]``) and lets ``window_days`` more pass. Returns
    ``pnl [X, I, H]``, each instrument's USD value change per contract (settlement asset
    converted at its own moved price), and ``dp [X, A, H]``, each asset's USD price change:
    an account's equity change in a window is ``sum qty * pnl + sum balance * dp``."""
    def one(state):
        s, v, h = state
        sp = jnp.concatenate([s[None, :], s[None, :] * window_mult])  # [1 + H, A]
        hor = jnp.concatenate([h[None], h + window_days + jnp.zeros(window_mult.shape[0], h.dtype)])
        rv = revalue(inst, market, sp, jnp.broadcast_to(v, sp.shape), hor)
        # settled at the state: a fixed amount of the settlement asset, whose price alone moves
        units = jnp.where(rv["live"][:, :1], rv["value"], rv["value"][:, :1])
        usd = units * rv["price"][inst.settlement]  # [I, 1 + H]
        return {"pnl": usd[:, 1:] - usd[:, :1], "dp": rv["price"][:, 1:] - rv["price"][:, :1]}

    return _each_state(one, (spot_mult, vol_shift, horizon_days), batch)


def _var_margin(snap: Any) -> dict:
    """``account_margin`` for the ``var`` model (README "Margin: the var model").

    IM = max(ES_c, var_floor * standard IM), with ES_c the expected shortfall at ``confidence``
    of the account's equity change (collateral included) over every overlapping window of
    ``var_horizon_days`` in ``var_history``, filtered by today's EWMA vol when ``var_filtered``;
    MM = ``mm_factor`` (0.8) * IM, as for the portfolio model. The per-underlying breakdown is
    the standard model's (the floor's); the var requirement is a whole-portfolio number.
    """
    from . import engine
    from .scenarios import Scenarios

    c, spot = var_windows(snap)
    S, A = spot.shape
    scen = Scenarios(tuple(f"w{i}" for i in range(S)), ("replay",) * S, spot, np.zeros((S, A)),
                     np.full(S, c["var_horizon_days"]))
    # the windows' revaluation only, as the run's var margin under stress takes it: not the var
    # model's margin in every window, and no closing fee or impact netted where the engine
    # would liquidate the account in a window
    plain = dataclasses.replace(snap, margin_config={**snap.margin_config, "model": "standard"}, liquidation_config={})
    _, acc, _, _ = engine._stream(plain, scen, None, "float64", None, False, level=c["confidence"])
    es = np.maximum(acc["es_99"], 0.0)  # a book that gains in every window needs no VaR margin
    std = account_margin(snap, "standard")
    floor = c["var_floor"] * std["accounts"]["initial_margin"].to_numpy()
    im = np.maximum(es, floor)
    mm = float(snap.params.pm_mm_factor) * im
    accounts = std["accounts"].copy()
    accounts["initial_margin"] = im
    accounts["maintenance_margin"] = mm
    accounts["liquidatable"] = accounts["collateral_value"].to_numpy() < mm
    accounts["expected_shortfall"] = es
    accounts["floor_binding"] = floor > es
    accounts["windows"] = S
    return {"model": "var", "accounts": accounts, "underlyings": std["underlyings"]}
