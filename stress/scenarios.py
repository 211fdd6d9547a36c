"""Scenario sets (SPEC section 3): TOML files of joint market shocks.

This module reads the explicit form::

    [[scenario]]
    name = "btc-down-30"
    moves = { BTC = -0.30, ETH = -0.35 }   # relative price change per asset; unlisted: 0
    vol_shift = { BTC = 0.20 }             # absolute implied-vol change (+20 vol points)
    horizon_days = 0                       # options revalued at T - horizon

Further forms (grids, events, replay, Monte Carlo) add rows with their own ``kind``; the
engine treats ``replay`` and ``montecarlo`` rows as the run's random scenarios.
"""

from __future__ import annotations

import dataclasses
import math
from importlib import resources
from pathlib import Path
from typing import Any

import numpy as np

from .errors import InputError
from .io import read_toml
from .snapshot import Snapshot

KINDS = ("explicit", "grid", "event", "replay", "montecarlo")
RANDOM_KINDS = ("replay", "montecarlo")
_EXPLICIT_KEYS = {"name", "moves", "vol_shift", "horizon_days"}


@dataclasses.dataclass(frozen=True)
class Scenarios:
    """A scenario set over the snapshot's assets. Rows are scenarios, in file order."""

    names: tuple[str, ...]  # [S]
    kinds: tuple[str, ...]  # [S], one of KINDS
    spot_mult: np.ndarray  # [S, A] scenario price / snapshot price, > 0
    vol_shift: np.ndarray  # [S, A] absolute implied-vol change of options on each underlying
    horizon_days: np.ndarray  # [S] days before revaluation, >= 0
    source: str = ""

    def __len__(self) -> int:
        return len(self.names)

    @property
    def random(self) -> np.ndarray:
        """``[S]`` bool: the run's random scenarios (Monte Carlo paths or replay windows)."""
        return np.isin(np.array(self.kinds, dtype=object), RANDOM_KINDS)


def default_path() -> Path:
    """The default scenario set: packaged with a wheel, or the repository's ``scenarios/``."""
    packaged = resources.files("stress") / "_scenarios" / "default.toml"
    if packaged.is_file():
        return Path(str(packaged))
    return Path(__file__).resolve().parent.parent / "scenarios" / "default.toml"


def load_scenarios(path: str | Path, snap: Snapshot, *, skip_unknown_assets: bool = False) -> Scenarios:
    """Read and validate a scenario file against the snapshot's assets.

    Args:
      path: the TOML file. snap: the snapshot whose assets the scenarios move.
      skip_unknown_assets: drop moves of assets the snapshot does not have instead of failing
        (used for the built-in default set, which names the common crypto assets).

    Raises:
      InputError: naming the file, the scenario and the field at fault.
    """
    path = Path(path)
    cfg = read_toml(path)
    file = path.name
    unknown = set(cfg) - {"scenario"}
    if unknown:
        raise InputError(file, None, sorted(unknown)[0], "unknown top-level key (expected [[scenario]] tables)")
    rows = cfg.get("scenario")
    if not isinstance(rows, list) or not rows:
        raise InputError(file, None, "scenario", "no [[scenario]] tables")
    A = snap.n_assets
    names, spot, vol, horizon = [], np.ones((len(rows), A)), np.zeros((len(rows), A)), np.zeros(len(rows))
    for s, row in enumerate(rows):
        label = f"scenario #{s + 1}"
        if not isinstance(row, dict):
            raise InputError(file, label, None, "must be a table")
        name = row.get("name")
        if not isinstance(name, str) or not name.strip():
            raise InputError(file, label, "name", "missing or empty name")
        label = f"scenario {name!r}"
        if name in names:
            raise InputError(file, label, "name", "duplicate scenario name")
        bad = set(row) - _EXPLICIT_KEYS
        if bad:
            raise InputError(file, label, sorted(bad)[0], f"unknown field (known: {', '.join(sorted(_EXPLICIT_KEYS))})")
        names.append(name)
        for key, target in (("moves", spot), ("vol_shift", vol)):
            table = row.get(key, {})
            if not isinstance(table, dict):
                raise InputError(file, label, key, "must be a table of asset = number")
            for asset, v in table.items():
                field = f"{key}.{asset}"
                if asset not in snap.assets:
                    if skip_unknown_assets:
                        continue
                    raise InputError(file, label, field, f"unknown asset {asset!r}")
                v = _finite(file, label, field, v)
                if key == "moves":
                    if v <= -1:
                        raise InputError(file, label, field, f"move {v:g} puts the price at or below zero")
                    target[s, snap.asset_index(asset)] = 1.0 + v
                else:
                    target[s, snap.asset_index(asset)] = v
        h = _finite(file, label, "horizon_days", row.get("horizon_days", 0))
        if h < 0:
            raise InputError(file, label, "horizon_days", "must be >= 0")
        horizon[s] = h
    return Scenarios(
        names=tuple(names),
        kinds=("explicit",) * len(names),
        spot_mult=spot,
        vol_shift=vol,
        horizon_days=horizon,
        source=str(path),
    )


def _finite(file: str, label: str, field: str, v: Any) -> float:
    if isinstance(v, bool) or not isinstance(v, (int, float)) or not math.isfinite(v):
        raise InputError(file, label, field, f"{v!r} is not a finite number")
    return float(v)

