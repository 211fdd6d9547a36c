"""Shared fixtures: a small sample exchange on disk and a builder for hand-made snapshots."""

from __future__ import annotations

from pathlib import Path

import pandas as pd
import pytest

from stress import sample


@pytest.fixture(scope="module", autouse=True)
def _fresh_jax_caches():
    """Drop the compiled kernels a test module leaves behind. After several hundred kernels in
    one process, XLA on CPU (jaxlib 0.10.2) aborted while (de)serialising one more for the disk
    cache; a run of the tool is one short process, the test session is not. Later modules
    reload what they share from the disk cache."""
    yield
    import jax

    jax.clear_caches()


@pytest.fixture(scope="session", autouse=True)
def _kept_kernels(tmp_path_factory):
    """Kernels kept traced on disk (``stress._exported``) go to a folder of this session, so
    that what a test traces does not depend on what earlier sessions left in the user cache."""
    import os

    os.environ["STRESS_EXPORT_CACHE"] = str(tmp_path_factory.mktemp("exported"))
    yield
    del os.environ["STRESS_EXPORT_CACHE"]


@pytest.fixture(scope="session")
def sample_tables() -> dict:
    """The sample exchange's tables, 400 accounts (deterministic)."""
    return sample.generate(accounts=400, seed=11)


@pytest.fixture(scope="session")
def sample_dir(tmp_path_factory, sample_tables) -> Path:
    """The 400-account sample exchange written as CSV files."""
    folder = tmp_path_factory.mktemp("sample_csv")
    sample.write_snapshot(folder, sample_tables, "csv")
    return folder


@pytest.fixture(scope="session")
def small_default_path(tmp_path_factory) -> Path:
    """The default scenario set with 200 Monte Carlo paths instead of 2,000 (every form, so
    engine invariants are checked on paths too, at a tenth of the cost)."""
    from stress.scenarios import default_path

    text = default_path().read_text()
    assert "paths = 2000" in text
    folder = tmp_path_factory.mktemp("scenarios")
    path = folder / "default-small.toml"
    path.write_text(text.replace("paths = 2000", "paths = 200"))
    return path


def copy_snapshot(src: Path, dest: Path, edit) -> Path:
    """A copy of the snapshot folder ``src`` at ``dest``, its exchange.toml text passed through
    ``edit`` (a function of the text)."""
    dest.mkdir(parents=True)
    for f in src.iterdir():
        (dest / f.name).write_bytes(f.read_bytes())
    (dest / "exchange.toml").write_text(edit((src / "exchange.toml").read_text()))
    return dest


def write_snapshot(folder: Path, *, assets, instruments, balances, positions, exchange_toml: str, fmt="csv") -> Path:
    """Write hand-made tables (lists of dicts or DataFrames) and an exchange.toml text."""
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "exchange.toml").write_text(exchange_toml)
    for name, rows in (("assets", assets), ("instruments", instruments), ("balances", balances), ("positions", positions)):
        df = rows if isinstance(rows, pd.DataFrame) else pd.DataFrame(rows)
        if fmt == "csv":
            df.to_csv(folder / f"{name}.csv", index=False)
        else:
            df.to_parquet(folder / f"{name}.parquet", index=False)
    return folder


EXCHANGE_TOML = """\
as_of = 2026-11-23T08:00:00Z
rate = 0.0
insurance_fund = { USDC = 1000000.0, BTC = 10.0 }
[margin]
[liquidation]
"""
