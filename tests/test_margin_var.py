"""The var margin model: expected shortfall of the whole account over historical windows,
floored at a fraction of standard margin, checked against hand arithmetic."""

from __future__ import annotations

import numpy as np
import pandas as pd
import pytest

import stress
from stress.margin import account_margin

from .conftest import write_snapshot

RETURNS = [0.01, -0.02, 0.03, -0.05, 0.004, -0.01, 0.02, -0.03, 0.005, 0.01,
           -0.04, 0.015, 0.002, -0.001, 0.003, 0.006, -0.007, 0.008, 0.001, -0.06]


def _snap(tmp_path, margin: str):
    tmp_path.mkdir(parents=True, exist_ok=True)
    prices = 100.0 * np.cumprod([1.0] + [1 + r for r in RETURNS])
    pd.DataFrame({"date": pd.date_range("2025-01-01", periods=len(prices)).strftime("%Y-%m-%d"),
                  "BTC": prices}).to_csv(tmp_path / "history.csv", index=False)
    toml = f"""as_of = 2026-11-23T08:00:00Z
rate = 0.0
insurance_fund = {{ USDC = 1000.0 }}
[margin]
{margin}
"""
    return stress.load_snapshot(write_snapshot(
        tmp_path, assets=[{"asset": "USDC", "price": 1.0, "haircut": 0.0}, {"asset": "BTC", "price": 100.0, "haircut": 0.0}],
        instruments=[{"instrument_id": "LIN", "kind": "perpetual", "underlying": "BTC", "settlement": "USDC",
                      "contract_size": 1.0, "mark_price": 100.0}],
        balances=[{"account_id": "a", "asset": "USDC", "amount": 10_000.0},
                  {"account_id": "b", "asset": "USDC", "amount": 10_000.0}],
        positions=[{"account_id": "a", "instrument_id": "LIN", "quantity": 10},
                   {"account_id": "b", "instrument_id": "LIN", "quantity": -10}],
        exchange_toml=toml))


BASE = 'model = "var"\nvar_history = "history.csv"\nvar_horizon_days = 1\nvar_filtered = false\nconfidence = 0.9\nvar_min_windows = 10\n'


def test_var_margin_is_the_expected_shortfall_of_the_windows(tmp_path):
    # 20 one-day windows, confidence 0.9: k = ceil(0.9 * 20) = 18, so ES is the mean of the 3
    # largest losses. Long 10 BTC at 100: loss = -1000 * r -> 60, 50, 40 -> ES = 50. The short:
    # loss = 1000 * r -> 30, 20, 15 -> ES = 65 / 3. Standard IM = 2% x 1000 = 20, floor
    # 0.5 x 20 = 10 binds for neither. MM = 0.8 x IM.
    res = account_margin(_snap(tmp_path, BASE + "var_floor = 0.5\n"))
    acc = res["accounts"].set_index("account_id")
    assert res["model"] == "var" and (acc.windows == 20).all()
    np.testing.assert_allclose(acc.expected_shortfall, [50.0, 65.0 / 3], rtol=1e-9)
    np.testing.assert_allclose(acc.initial_margin, [50.0, 65.0 / 3], rtol=1e-9)
    np.testing.assert_allclose(acc.maintenance_margin, [40.0, 0.8 * 65.0 / 3], rtol=1e-9)
    assert not acc.floor_binding.any() and not acc.liquidatable.any()


def test_var_margin_is_floored_at_a_fraction_of_standard_margin(tmp_path):
    # var_floor = 2: floor = 2 x 20 = 40 > the short's ES of 21.67, below the long's 50.
    acc = account_margin(_snap(tmp_path, BASE + "var_floor = 2.0\n"))["accounts"].set_index("account_id")
    np.testing.assert_allclose(acc.initial_margin, [50.0, 40.0], rtol=1e-9)
    assert list(acc.floor_binding) == [False, True]


def test_filtered_history_rescales_the_losses(tmp_path):
    plain = account_margin(_snap(tmp_path, BASE))["accounts"].expected_shortfall.to_numpy()
    tmp2 = tmp_path / "f"
    filt = account_margin(_snap(tmp2, BASE.replace("var_filtered = false", "var_filtered = true")))
    assert not np.allclose(filt["accounts"].expected_shortfall.to_numpy(), plain)


def test_short_history_and_missing_history_are_input_errors(tmp_path):
    with pytest.raises(stress.InputError) as err:
        account_margin(_snap(tmp_path, BASE.replace("var_min_windows = 10", "var_min_windows = 30")))
    assert err.value.column == "var_history" and "at least var_min_windows = 30" in err.value.message
    with pytest.raises(stress.InputError) as err:
        _snap(tmp_path / "m", 'model = "var"\n')
    assert (err.value.file, err.value.column) == ("exchange.toml", "var_history")
    with pytest.raises(stress.InputError) as err:
        _snap(tmp_path / "c", BASE.replace("confidence = 0.9", "confidence = 1.5"))
    assert err.value.column == "confidence"


def _thin(tmp_path, margin: str, amount: float = 30.0):
    """The book above with account a holding 30 USDC (or ``amount``) instead of 10,000."""
    _snap(tmp_path, margin)
    bal = pd.read_csv(tmp_path / "balances.csv")
    bal.loc[bal.account_id == "a", "amount"] = amount
    bal.to_csv(tmp_path / "balances.csv", index=False)
    return stress.load_snapshot(tmp_path)


def _scen():
    from stress.scenarios import Scenarios

    spot = np.array([[1.0, 1.0], [0.98, 1.0], [1.1, 1.0]])  # BTC, USDC: a snapshot's assets are in name order
    return Scenarios(("flat", "down2", "up10"), ("explicit",) * 3, spot, np.zeros((3, 2)), np.zeros(3))


def test_the_run_recomputes_var_margin_around_every_scenario(tmp_path):
    # down2 (BTC 98): a's equity 30 - 10 x 2 = 10. Windows re-based at 98: losses -10 x 98 x r,
    # the three largest 58.8, 49, 39.2 -> ES 49; floor 0.5 x 2% x 980 = 9.8; MM 0.8 x 49 = 39.2;
    # shortfall 39.2 - 10 = 29.2. b (short, 10,000 USDC) is far from its margin.
    # flat: MM 40 (the snapshot's, as stress margin says) - 30 = 10.
    # up10 (BTC 110): equity 130; losses -1,100 r -> 66, 55, 44 -> MM 0.8 x 55 = 44 < 130.
    res = stress.run(_thin(tmp_path / "var", BASE + "var_floor = 0.5\n"), _scen())
    sc = res.scenarios.set_index("scenario")
    np.testing.assert_allclose(sc.shortfall_total, [10.0, 29.2, 0.0], rtol=1e-12)
    assert sc.accounts_liquidatable.tolist() == [1, 1, 0]
    acc = res.accounts.set_index("account_id")
    np.testing.assert_allclose(acc.maintenance_margin, [40.0, 0.8 * 65.0 / 3], rtol=1e-12)
    np.testing.assert_allclose(acc.initial_margin, [50.0, 65.0 / 3], rtol=1e-12)
    assert res.summary["margin_model"] == "var"
    # the same at the snapshot as stress margin --model var
    m = account_margin(_thin(tmp_path / "var", BASE + "var_floor = 0.5\n"))["accounts"].set_index("account_id")
    np.testing.assert_allclose(acc.maintenance_margin, m.maintenance_margin, rtol=1e-12)

    # Under the standard model a needs 1% x 980 = 9.8 < 10 in down2: not liquidatable there.
    std = stress.run(_thin(tmp_path / "std", ""), _scen()).scenarios.set_index("scenario")
    assert std.accounts_liquidatable.tolist() == [0, 0, 0]


def test_var_margin_under_stress_is_floored_at_the_standard_margin_of_the_state(tmp_path):
    # var_floor = 5: floor at down2 = 5 x 19.6 = 98 > ES 49 -> MM 0.8 x 98 = 78.4; shortfall 68.4.
    res = stress.run(_thin(tmp_path, BASE + "var_floor = 5.0\n"), _scen())
    assert res.scenarios.set_index("scenario").shortfall_total["down2"] == pytest.approx(78.4 - 10.0, rel=1e-12)


def test_var_floor_under_stress_takes_the_risk_limit_tier_of_the_state(tmp_path):
    # IM 2% up to 900 USD of notional, 4% above; var_floor = 5, so the floor binds everywhere.
    # flat (BTC 100): notional 1,000 -> IM 40, floor 200, MM 0.8 x 200 = 160; a's equity 30.
    # down2 (98): 980 -> IM 39.2, floor 196, MM 156.8; equity 10 -> shortfall 146.8.
    # up10 (110): 1,100 -> IM 44, floor 220, MM 176; equity 130 -> shortfall 46.
    # (Untiered, 2%, the floors would be 100, 98 and 110.) b holds 10,000 USDC: never short.
    tiers = "future_tiers = [[900, 0.02, 0.01], [1e9, 0.04, 0.02]]\n"
    res = stress.run(_thin(tmp_path / "run", BASE + "var_floor = 5.0\n" + tiers), _scen())
    sc = res.scenarios.set_index("scenario")
    np.testing.assert_allclose(sc.shortfall_total, [130.0, 146.8, 46.0], rtol=1e-12)
    acc = res.accounts.set_index("account_id")
    np.testing.assert_allclose(acc.maintenance_margin, [160.0, 160.0], rtol=1e-12)
    # at the snapshot, the same as stress margin --model var, whose floor is the tiered IM
    m = account_margin(_thin(tmp_path / "margin", BASE + "var_floor = 5.0\n" + tiers))["accounts"].set_index("account_id")
    np.testing.assert_allclose(acc.maintenance_margin, m.maintenance_margin, rtol=1e-12)


def test_var_margin_takes_no_liquidation_fee_at_the_snapshot_or_under_stress(tmp_path):
    # a holds 65 USDC: in the worst window (r = -6%) its equity is 5, under the standard MM of
    # 1% x 940, so the engine would close it there and charge the 5% fee out of those 5. The
    # var model's losses are the revaluation's: the three largest 60, 50, 40, ES 50, MM 40,
    # in stress margin as in the run's snapshot margin.
    margin = BASE + "var_floor = 0.5\n[liquidation]\nfee_rate = 0.05\n"
    m = account_margin(_thin(tmp_path / "margin", margin, 65.0))["accounts"].set_index("account_id")
    assert m.expected_shortfall["a"] == pytest.approx(50.0, rel=1e-12)
    res = stress.run(_thin(tmp_path / "run", margin, 65.0), _scen())
    np.testing.assert_allclose(res.accounts.set_index("account_id").maintenance_margin, m.maintenance_margin, rtol=1e-12)


def test_var_margin_under_stress_does_not_depend_on_chunking_or_path_steps(tmp_path):
    # A two-step path, down2 then back to flat, is decided at its first step, where the
    # margin is the var margin around down2 (29.2 short, not flat's 10); chunk sizes 1 and 128
    # agree.
    from stress.scenarios import Scenarios

    snap = _thin(tmp_path, BASE + "var_floor = 0.5\n")
    path = Scenarios(("p",), ("montecarlo",), np.array([[1.0, 1.0]]), np.zeros((1, 2)), np.zeros(1),
                     path_spot_mult=np.array([[[0.98, 1.0]]]), path_vol_shift=np.zeros((1, 1, 2)),
                     path_horizon_days=np.zeros((1, 1)))
    a = stress.run(snap, path, chunk_size=1).scenarios
    b = stress.run(snap, path).scenarios
    assert a.shortfall_total[0] == pytest.approx(29.2, rel=1e-12) == b.shortfall_total[0]
    assert a.accounts_liquidatable[0] == b.accounts_liquidatable[0] == 1


def test_var_margin_along_many_paths_matches_hand_arithmetic_at_every_step(tmp_path):
    # 40 paths of 3 steps: tiles of 8 paths x 3 steps, so the var margin is taken in blocks of
    # states (portfolio.VAR_BLOCK). a holds 80 USDC and is long 10 BTC: at price P its equity
    # is 80 + 10 (P - 100); its window losses -10 P r, the three largest 10 P (6%, 5%, 4%), so
    # ES = 0.5 P, the floor 0.5 x 2% x 10 P = 0.1 P does not bind and MM = 0.8 x 0.5 P = 0.4 P.
    # A path is decided at its first step with MM > equity (P < 95.83), its shortfall taken
    # there. b (short, 10,000 USDC) never comes near its margin.
    from stress import engine, portfolio
    from stress.scenarios import Scenarios

    snap = _thin(tmp_path, BASE + "var_floor = 0.5\n", 80.0)
    rng = np.random.default_rng(3)
    P = 100.0 * np.exp(np.cumsum(0.03 * rng.standard_normal((40, 3)), axis=1))  # [path, step]
    spot = np.stack([P / 100.0, np.ones_like(P)], axis=2)  # [path, step, (BTC, USDC)]: assets in name order
    scen = Scenarios(tuple(f"p{i}" for i in range(40)), ("montecarlo",) * 40, spot[:, -1], np.zeros((40, 2)),
                     np.zeros(40), path_spot_mult=spot[:, :-1], path_vol_shift=np.zeros((40, 2, 2)),
                     path_horizon_days=np.zeros((40, 2)))
    assert engine.scenario_tile(40, 3, True) * 3 > portfolio.VAR_BLOCK
    gap = 0.4 * P - (80.0 + 10.0 * (P - 100.0))  # [path, step]
    breached = gap > 0
    first = np.argmax(breached, axis=1)
    want = np.where(breached.any(axis=1), gap[np.arange(40), first], 0.0)
    assert 5 <= breached.any(axis=1).sum() <= 35  # both kinds of path are there
    for chunk in (1, None):
        sc = stress.run(snap, scen, chunk_size=chunk).scenarios
        np.testing.assert_allclose(sc.shortfall_total, want, rtol=1e-12, atol=1e-9)
        assert sc.accounts_liquidatable.tolist() == breached.any(axis=1).astype(int).tolist()


@pytest.mark.parametrize("r", [1, 3, 12])
def test_the_tail_mean_counts_ties_as_often_as_they_occur(r):
    from stress.portfolio import largest_mean

    x = np.random.default_rng(5).integers(0, 6, (4, 3, 40)).astype(float)  # many ties
    want = np.sort(x, axis=-1)[..., -r:].mean(axis=-1)
    np.testing.assert_allclose(np.asarray(largest_mean(x, r)), want, rtol=1e-15)


def test_a_model_table_too_large_for_memory_is_refused_with_its_size(tmp_path, monkeypatch):
    # 3 scenarios -> 4 states x 1 instrument x 20 windows x 8 bytes, twice: 1,280 bytes
    from stress import engine
    from stress.errors import InputError

    monkeypatch.setattr(engine, "_memory_bytes", lambda: 2_000.0)  # half of it: 1,000 bytes
    with pytest.raises(InputError, match=r"20 history windows around each of 4 scenario states"):
        stress.run(_thin(tmp_path, BASE), _scen())
    monkeypatch.setattr(engine, "_memory_bytes", lambda: 3_000.0)
    assert stress.run(_thin(tmp_path, BASE), _scen()).summary["margin_model"] == "var"


def test_margin_command_says_its_per_underlying_table_is_the_floors_under_var(tmp_path):
    from typer.testing import CliRunner

    from stress.cli import app

    _snap(tmp_path, BASE + "var_floor = 0.5\n")
    r = CliRunner().invoke(app, ["margin", str(tmp_path)], terminal_width=200)
    assert r.exit_code == 0, r.output
    text = " ".join(r.output.split())
    assert "var margin (USD)" in text and "the var floor's base, not the var margin" in text
