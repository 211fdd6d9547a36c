"""The fused Pallas chunk kernel (run here in Pallas's interpret mode) against the XLA kernel:
the same stress run, column for column, on the sample exchange with a liquidation fee."""

from __future__ import annotations

import numpy as np
import pytest

import stress
from stress import _exported, engine, fused, portfolio, sample
from stress.scenarios import Scenarios


@pytest.fixture(scope="module")
def fee_snapshot(tmp_path_factory, sample_tables):
    folder = tmp_path_factory.mktemp("fused")
    sample.write_snapshot(folder, sample_tables, "parquet")
    toml = folder / "exchange.toml"
    text = toml.read_text()
    assert "[liquidation]" in text
    toml.write_text(text.replace("[liquidation]", "[liquidation]\nfee_rate = 0.002"))
    return stress.load_snapshot(folder)


def _shocks(n: int, n_assets: int) -> Scenarios:
    """Large joint moves (30% lognormal spot, vol shifts of 0.2), so that accounts breach,
    pay the fee and leave bad debt; one scenario repeated twice makes ties for the worst, in the
    same tile of scenarios and (with tiles of 16) in another."""
    rng = np.random.default_rng(3)
    spot = np.exp(0.3 * rng.standard_normal((n, n_assets)))
    vol = 0.2 * rng.standard_normal((n, n_assets))
    for twin in (7, 20)[: (n > 7) + (n > 20)]:
        spot[twin], vol[twin] = spot[2], vol[2]
    return Scenarios(tuple(f"s{i:03d}" for i in range(n)), ("explicit",) * n, spot, vol, np.zeros(n), source="test")


# block shapes: one program per chunk; two per chunk (so that some hold only padding rows) of
# one-account blocks (so that a scenario's two largest bad debts often share a row of the
# kernel's accumulators); and tiles of 16 scenarios, one launch per tile (merged across launches)
@pytest.mark.parametrize("blocks, tile, pass_bytes", [((16, 128, 1024, 4), None, None), ((1, 64, 64, 4), None, None),
                                                       ((4, 16, 32, 4), 16, 1)])
def test_the_fused_kernel_reproduces_the_xla_kernel_run(fee_snapshot, monkeypatch, blocks, tile, pass_bytes,
                                                        dtype="float64", rtol=1e-12):
    monkeypatch.setitem(fused.BLOCKS, dtype, blocks)
    if tile:
        monkeypatch.setitem(engine.TILE, "cpu", tile)
        monkeypatch.setitem(engine.TILE, "cpu-float64", tile)
        monkeypatch.setattr(fused, "PASS_BYTES", pass_bytes)
    # every rung of the ladder, though this small exchange would leave most of them out
    monkeypatch.setattr(portfolio, "RUNG_MIN_ACCOUNTS", 0)
    monkeypatch.setattr(portfolio, "RUNG_MIN_WORK", -1)
    engine.forget_layout(fee_snapshot)
    scen = _shocks(40, fee_snapshot.n_assets)
    ref = stress.run(fee_snapshot, scen, dtype=dtype)
    assert ref.scenarios.fees.sum() > 0 and ref.scenarios.bad_debt.sum() > 0  # the run exercises both
    assert (ref.scenarios.cover2 > ref.accounts.bad_debt_worst.max()).any()  # two accounts default at once

    calls = []
    real = fused.group_kernel
    shape = lambda h: h.asset.shape[-1:] + h.inst.shape[-2:]  # noqa: E731  (J, P, L)
    monkeypatch.setattr(fused, "group_kernel", lambda h, t: calls.append(shape(h)) or real(h, t))
    monkeypatch.setenv("STRESS_EXPORT_CACHE", "0")  # the calls are recorded while tracing: always trace
    monkeypatch.setattr(fused, "MAX_POSITIONS", 4)  # wider buckets interpret slowly: XLA takes them
    monkeypatch.setitem(engine.PALLAS, "cpu", True)
    engine.sharded_kernel.cache_clear()
    try:
        res = stress.run(fee_snapshot, scen, dtype=dtype)
    finally:
        engine.sharded_kernel.cache_clear()
        engine.forget_layout(fee_snapshot)  # laid out with every rung: not for later tests
    # it ran, on several slots and positions too, and on balance-only slots: every bucket
    # (J slots, P of them with L positions each) of at most MAX_POSITIONS positions
    assert set(calls) == {(1, 1, 1), (2, 1, 1), (4, 2, 1), (4, 2, 2), (4, 4, 1)}

    for frame in ("accounts", "scenarios"):
        a, b = getattr(res, frame), getattr(ref, frame)
        assert list(a.columns) == list(b.columns)
        for c in a.columns:
            x, y = a[c].to_numpy(), b[c].to_numpy()
            if np.issubdtype(x.dtype, np.floating):
                scale = max(1.0, float(np.max(np.abs(np.nan_to_num(y)))))
                np.testing.assert_allclose(x, y, rtol=0, atol=rtol * scale, err_msg=f"{frame}.{c}")  # NaN where NaN
            else:
                assert (x == y).all(), f"{frame}.{c}"


def test_the_fused_kernel_leaves_other_runs_to_the_xla_kernel(fee_snapshot):
    scen = _shocks(8, fee_snapshot.n_assets)
    t, _ = engine.tables(fee_snapshot, scen, engine.DTYPES["float64"])
    groups = list(engine._groups(fee_snapshot, 128, np.float64, 1))
    h = groups[0][1]
    assert fused.applies(h, t, 0, False)
    assert not fused.applies(h, t, 0, True)  # the P&L matrix is asked for
    assert not fused.applies(h, t, 16, False)  # Monte Carlo tail losses
    wide = [g for _, g in groups if g.inst.shape[-2] * g.inst.shape[-1] > fused.MAX_POSITIONS]
    assert wide and not fused.applies(wide[0], t, 0, False)


@pytest.mark.parametrize("dtype", ["float32", "float64"])
def test_the_fused_kernel_lowers_to_triton_for_a_gpu(fee_snapshot, dtype, monkeypatch):
    # Lowered for CUDA on this CPU machine: every operation of the kernel has a Triton
    # lowering (compiling it to GPU code needs the GPU; bench/gpu.py runs it there).
    import jax

    # every rung, so the small exchange has a (4, 2, 2) bucket of its own
    monkeypatch.setattr(portfolio, "RUNG_MIN_ACCOUNTS", 0)
    monkeypatch.setattr(portfolio, "RUNG_MIN_WORK", -1)
    dt = engine.DTYPES[dtype]
    t, _ = engine.tables(fee_snapshot, _shocks(8, fee_snapshot.n_assets), dt)
    groups = engine._groups(fee_snapshot, 128, dt, 1)
    h = next(g for _, g in groups if g.inst.shape[-2:] == (2, 2) and g.asset.shape[-1] == 4)  # (4, 2, 2)
    # exported as stress._exported keeps kernels on disk: flat arguments, Triton's check disabled
    leaves, treedef = jax.tree_util.tree_flatten((jax.device_put(h), t))
    lowered = _exported.export(lambda h, t: fused.group_kernel(h, t, interpret=False), treedef,
                               [_exported.spec(x) for x in leaves], platforms=["cuda"])
    assert "__gpu$xla.gpu.triton" in lowered.mlir_module()
    kept = jax.export.deserialize(lowered.serialize())  # and it round-trips
    assert kept.platforms == ("cuda",) and "__gpu$xla.gpu.triton" in kept.mlir_module()
