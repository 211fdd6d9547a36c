"""stress: GPU-batched stress testing for cross-margin derivatives exchanges, on JAX.

The public API (SPEC section 4)::

    import stress
    snap = stress.load_snapshot("path/to/snapshot")
    scen = stress.load_scenarios("scenarios/default.toml", snap)
    res = stress.run(snap, scen)          # res.accounts, res.scenarios, res.summary
    pnl = stress.pnl_matrix(snap, scen)   # accounts x scenarios equity change, USD
    r = stress.reverse(snap, scen)        # smallest move that exhausts the insurance fund
"""

from __future__ import annotations

import os
from typing import TYPE_CHECKING, Any


def _cpu_devices() -> None:
    """Expose every CPU core as a JAX device, so chunks run on all of them in parallel.

    Must happen before JAX starts its CPU backend; ``STRESS_CPU_DEVICES`` overrides the count,
    and an explicit ``--xla_force_host_platform_device_count`` in ``XLA_FLAGS`` wins.
    """
    flags = os.environ.get("XLA_FLAGS", "")
    if "xla_force_host_platform_device_count" in flags:
        return
    n = int(os.environ.get("STRESS_CPU_DEVICES", min(os.cpu_count() or 1, 8)))
    os.environ["XLA_FLAGS"] = f"{flags} --xla_force_host_platform_device_count={n}".strip()


_cpu_devices()

from .errors import InputError as InputError

__all__ = ["InputError", "load_snapshot", "load_scenarios", "run", "pnl_matrix", "greeks", "reverse", "Result", "Snapshot", "Scenarios"]
__version__ = "0.1.0"

# Imported lazily so that `stress --help` and error paths do not pay for importing JAX.
_LAZY = {
    "load_snapshot": ("io", "load_snapshot"),
    "load_scenarios": ("scenarios", "load_scenarios"),
    "run": ("engine", "run"),
    "pnl_matrix": ("engine", "pnl_matrix"),
    "greeks": ("greeks", "greeks"),
    "reverse": ("reverse", "reverse"),
    "Result": ("engine", "Result"),
    "Snapshot": ("snapshot", "Snapshot"),
    "Scenarios": ("scenarios", "Scenarios"),
}

if TYPE_CHECKING:
    from .engine import Result, pnl_matrix, run
    from .greeks import account_greeks as greeks
    from .io import load_snapshot
    from .reverse import reverse
    from .scenarios import Scenarios, load_scenarios
    from .snapshot import Snapshot


def __getattr__(name: str) -> Any:
    if name in _LAZY:
        import importlib

        module, attr = _LAZY[name]
        value = getattr(importlib.import_module(f".{module}", __name__), attr)
        globals()[name] = value
        return value
    raise AttributeError(f"module 'stress' has no attribute {name!r}")
