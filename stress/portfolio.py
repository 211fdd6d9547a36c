"""From instruments to accounts: holdings layout, per-asset net amounts, equity, collateral.

Holdings are fixed-width lists per account: ``inst [n, K]`` (instrument index) and
``qty [n, K]`` (contracts, 0 in padding slots). Accounts are grouped by holding count into
buckets of width ``K`` = a power of two, so an account with 2 positions is not padded to the
width of a market maker with 300, and each bucket compiles once.
"""

from __future__ import annotations

import dataclasses
from typing import Any

import jax
import jax.numpy as jnp
import numpy as np

from ._tree import pytree_dataclass

UNROLL_MAX = 16  # widths up to this are unrolled (XLA fuses them); wider ones loop


@pytree_dataclass
class Holdings:
    """A chunk of accounts, padded to a fixed shape."""

    inst: Any  # [n, K] int32 instrument index (0 in padding slots)
    qty: Any  # [n, K] contracts, signed; 0 in padding slots and padding rows
    weight: Any  # [n, K] margin weight (see margin.position_weight); 0 in padding
    balance: Any  # [n, A] amount of each asset
    valid: Any  # [n] bool: a real account (False for padding rows)


@dataclasses.dataclass(frozen=True)
class Bucket:
    """Accounts whose holding count fits width ``K``, as host arrays ready to slice into chunks."""

    K: int
    accounts: np.ndarray  # [m] account index, ascending
    slots: np.ndarray  # [m, K] position index into the snapshot's COO arrays, -1 in padding


def buckets(pos_account: np.ndarray, n_accounts: int) -> list[Bucket]:
    """Group accounts by holding count (positions sorted by account) into power-of-two widths."""
    counts = np.bincount(pos_account, minlength=n_accounts)
    start = np.concatenate([[0], np.cumsum(counts)[:-1]])
    width = np.maximum(1, 1 << np.ceil(np.log2(np.maximum(counts, 1))).astype(np.int64))
    out = []
    for K in np.unique(width):
        acc = np.flatnonzero(width == K)
        k = np.arange(K)
        slots = np.where(k[None, :] < counts[acc, None], start[acc, None] + k[None, :], -1)
        out.append(Bucket(int(K), acc, slots))
    return out


def net_amounts(h: Holdings, value: Any, settlement: Any, n_assets: int) -> Any:
    """Net amount of each asset per account per scenario: balances plus position values.

    Args:
      h: a chunk of holdings ``[n, K]``.
      value: ``[I, S]`` value per contract in its settlement asset's units.
      settlement: ``[I]`` settlement asset index.
      n_assets: ``A``.

    Returns:
      ``[n, A, S]`` amounts in each asset's own units.
    """
    n, K = h.inst.shape
    assets = jnp.arange(n_assets)

    def add(e, k):
        i = h.inst[:, k]
        w = h.qty[:, k][:, None] * (settlement[i][:, None] == assets[None, :])  # [n, A]
        return e + w[:, :, None] * value[i][:, None, :]

    e = jnp.broadcast_to(h.balance[:, :, None], (n, n_assets, value.shape[1])).astype(value.dtype)
    if K <= UNROLL_MAX:
        for k in range(K):
            e = add(e, k)
        return e
    return jax.lax.fori_loop(0, K, lambda k, e: add(e, k), e)


def weighted_sum(h: Holdings, per_contract: Any) -> Any:
    """``sum_k weight[n, k] * per_contract[inst[n, k], S]`` → ``[n, S]`` (e.g. margin)."""
    n, K = h.inst.shape

    def add(acc, k):
        return acc + h.weight[:, k][:, None] * per_contract[h.inst[:, k]]

    acc = jnp.zeros((n, per_contract.shape[1]), per_contract.dtype)
    if K <= UNROLL_MAX:
        for k in range(K):
            acc = add(acc, k)
        return acc
    return jax.lax.fori_loop(0, K, lambda k, a: add(a, k), acc)


def equity(e: Any, price: Any) -> Any:
    """Account equity, USD: ``sum_a e[n, a, S] * price[a, S]`` → ``[n, S]``."""
    return jnp.einsum("nas,as->ns", e, price)


def collateral(e: Any, price: Any, haircut: Any) -> Any:
    """Collateral value, USD: haircuts apply to each asset's positive net amount → ``[n, S]``."""
    factor = jnp.where(e > 0, 1.0 - haircut[None, :, None], 1.0)
    return jnp.sum(factor * e * price[None], axis=1)
