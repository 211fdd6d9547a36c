"""Black-Scholes against published values, parity, limits and gradients."""

from __future__ import annotations

import jax
import jax.numpy as jnp
import numpy as np
import pytest

from stress.pricing import black_scholes


def test_black_scholes_matches_hull_example_15_6():
    # Hull, Options, Futures and Other Derivatives, Example 15.6: S=42, K=40, r=10%,
    # sigma=20%, T=0.5 -> call 4.76, put 0.81 (4.759422392871535 and 0.8085993729000958).
    call = black_scholes(42.0, 40.0, 0.5, 0.2, 0.1, True)
    put = black_scholes(42.0, 40.0, 0.5, 0.2, 0.1, False)
    np.testing.assert_allclose(call, 4.759422392871535, rtol=1e-12)
    np.testing.assert_allclose(put, 0.8085993729000958, rtol=1e-12)
    assert round(float(call), 2) == 4.76 and round(float(put), 2) == 0.81


def test_black_scholes_greeks_by_autodiff_match_hull_greek_letters_example():
    # Hull, "The Greek Letters": S=49, K=50, r=5%, sigma=20%, T=20 weeks (0.3846):
    # call 2.40, delta 0.522, gamma 0.066, vega 12.1, theta -4.31 per year, rho 8.91.
    S, K, T, vol, r = 49.0, 50.0, 0.3846, 0.2, 0.05
    f = lambda S, T, vol, r: black_scholes(S, K, T, vol, r, True)
    assert round(float(f(S, T, vol, r)), 2) == 2.40
    assert round(float(jax.grad(f, 0)(S, T, vol, r)), 3) == 0.522
    assert round(float(jax.grad(jax.grad(f, 0), 0)(S, T, vol, r)), 3) == 0.066
    assert round(float(jax.grad(f, 2)(S, T, vol, r)), 1) == 12.1
    assert round(float(-jax.grad(f, 1)(S, T, vol, r)), 2) == -4.31
    assert round(float(jax.grad(f, 3)(S, T, vol, r)), 2) == 8.91


@pytest.mark.parametrize("S", [50.0, 90_000.0, 120_000.0])
@pytest.mark.parametrize("T", [0.01, 0.5, 2.0])
def test_put_call_parity(S, T):
    K, vol, r = 100_000.0 * S / 90_000.0 * 1.1, 0.6, 0.03
    c = black_scholes(S, K, T, vol, r, True)
    p = black_scholes(S, K, T, vol, r, False)
    np.testing.assert_allclose(c - p, S - K * np.exp(-r * T), rtol=1e-12, atol=1e-9 * S)


def test_expired_option_is_worth_its_intrinsic_value_with_finite_gradient():
    v = black_scholes(jnp.array([90.0, 110.0]), 100.0, jnp.array([0.0, -0.1]), 0.5, 0.0, True)
    np.testing.assert_allclose(v, [0.0, 10.0])
    g = jax.grad(lambda S: black_scholes(S, 100.0, 0.0, 0.5, 0.0, True))(110.0)
    assert np.isfinite(g) and g == 1.0


def test_deep_in_and_out_of_the_money_limits():
    # Far in the money a call is worth S - K e^{-rT}; far out, nothing.
    np.testing.assert_allclose(black_scholes(1e6, 100.0, 1.0, 0.2, 0.05, True), 1e6 - 100 * np.exp(-0.05), rtol=1e-12)
    assert float(black_scholes(1.0, 1e6, 1.0, 0.2, 0.05, True)) < 1e-200
