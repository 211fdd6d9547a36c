"""Margin requirements: the ``standard`` model (isolated-style, summed over positions).

Rules (USD per contract, at the scenario's prices; ``S`` the underlying price, ``m`` the
option's value per coin in USD, ``n`` the notional per contract of SPEC section 2):

- futures and perpetuals: ``IM = im_rate * n``, ``MM = mm_rate * n``, on long and short
  positions alike (Deribit's base rates: IM 2%, MM 1%; the size-dependent add-on and risk-limit
  tiers come with the portfolio-margin work).
- short options, Deribit standard option margin (contract on ``c`` coins):
  ``IM = c * (max(a - OTM/S, b) * S + m)``, with puts floored at their MM;
  ``MM = c * (mm_rate * S + m)`` for calls and ``c * (max(mm_rate * S, mm_rate * m) + m)`` for
  puts, where ``OTM = max(K - S, 0)`` for calls and ``max(S - K, 0)`` for puts, ``a = im_rate``
  (0.15), ``b = option_im_floor`` (0.10), ``mm_rate`` 0.075.
- long options: none (the premium is paid; its value already counts in equity).

An account's requirement is the sum over its positions of ``weight * per-contract
requirement``, with weight ``|quantity|`` for futures and ``max(-quantity, 0)`` for options. A
second model (portfolio / risk-matrix margin) plugs in beside ``standard`` by providing
requirements per account from the same revalued matrices.
"""

from __future__ import annotations

import math
from typing import Any

import jax.numpy as jnp
import numpy as np

from .errors import InputError
from .snapshot import OPTION, Instruments, Params

MODELS = ("standard",)

# Defaults of exchange.toml [margin]; see the module docstring and README "Margin".
DEFAULTS = {
    "model": "standard",
    "future_im_rate": 0.02,
    "future_mm_rate": 0.01,
    "option_im_rate": 0.15,
    "option_im_floor": 0.10,
    "option_mm_rate": 0.075,
}


def params_from_config(
    cfg: dict, inst: Instruments, haircut: np.ndarray, overrides: tuple[np.ndarray, np.ndarray]
) -> Params:
    """Resolve ``[margin]`` defaults and per-instrument ``im_rate``/``mm_rate`` into ``Params``."""
    file = "exchange.toml"
    unknown = set(cfg) - set(DEFAULTS)
    if unknown:
        key = sorted(unknown)[0]
        raise InputError(file, "[margin]", key, f"unknown key (known: {', '.join(DEFAULTS)})")
    values = {**DEFAULTS, **cfg}
    if values["model"] not in MODELS:
        raise InputError(file, "[margin]", "model", f"{values['model']!r} is not one of {MODELS}")
    for key, v in values.items():
        if key == "model":
            continue
        if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v) or v < 0:
            raise InputError(file, "[margin]", key, f"{v!r} must be a number >= 0")
    is_opt = np.asarray(inst.kind) == OPTION
    im_over, mm_over = overrides
    im = np.where(is_opt, values["option_im_rate"], values["future_im_rate"])
    mm = np.where(is_opt, values["option_mm_rate"], values["future_mm_rate"])
    return Params(
        im_rate=np.where(np.isnan(im_over), im, im_over),
        mm_rate=np.where(np.isnan(mm_over), mm, mm_over),
        option_im_floor=np.float64(values["option_im_floor"]),
        haircut=np.asarray(haircut, dtype=np.float64),
    )


def position_weight(kind: Any, quantity: Any) -> Any:
    """How many contracts of a position carry the per-contract requirement."""
    return jnp.where(kind == OPTION, jnp.maximum(-quantity, 0.0), jnp.abs(quantity))


def per_contract(inst: Instruments, params: Params, spot: Any, value: Any) -> tuple[Any, Any]:
    """Initial and maintenance margin per contract, USD, standard model.

    Args:
      inst: instrument terms ``[I]``.
      params: risk parameters.
      spot: ``[I, S]`` price of each instrument's underlying, USD.
      value: ``[I, S]`` option value per coin of underlying, USD (ignored for futures).

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
    return jnp.where(is_opt, opt_im, fut_im), jnp.where(is_opt, opt_mm, fut_mm)
