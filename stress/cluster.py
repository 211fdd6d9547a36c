"""A run spread over a Dask distributed cluster: account partitions, one engine per worker.

Accounts are independent within a pass, so the exchange is cut into partitions (contiguous
ranges of account index) and each worker sweeps its partitions with the single-machine engine
(``engine.LocalAccounts``, jitted, on that machine's devices). The client keeps everything
exchange-wide: it revalues the instruments (``engine.tables``), charges the price impact
between the two passes, ranks accounts for auto-deleveraging and writes the report; only the
pass's inputs and outputs travel (docs/cluster.md):

- each worker's sub-snapshot, once (``client.scatter``), kept there for every pass;
- per pass, to every worker: the tables, ``[T, I, K*W]`` per instrument, step and scenario;
- per pass, back: per-scenario sums (``[S]`` rows; contracts closed ``[T, 2, n_impact, K*W]``
  for the impact's pass 1) and the partition's per-account columns; the auto-deleveraging pass
  returns, per deficit scenario, only the partition's accounts that ADL may charge there (its
  winners, by rank, until their profit covers the deficit: ``engine.adl_candidates``), not
  the partition's P&L;
- liquidation cascades, per step of each tile of paths: the step's instrument tables out, the
  contracts each partition closed back (``cascade.run(parts=...)``); each partition's
  first-breach steps stay on its worker between the steps, in a Dask actor (``CascadePart``).

Partials of disjoint accounts merge exactly (``engine.merge``), so the results are those of the
single-machine run, to rounding in the order of the exchange-wide sums.

Dask is an optional extra (``pip install 'stress[cluster]'``); it is imported only when a
cluster is used, and ``take_accounts`` needs none of it.
"""

from __future__ import annotations

import dataclasses
from typing import Any, Callable

import jax
import jax.numpy as jnp
import numpy as np

from . import cascade, engine
from .scenarios import Scenarios
from .snapshot import Snapshot

CONNECT_TIMEOUT = 10.0  # seconds to reach a scheduler (and see a worker) before giving up
INSTALL_HINT = "pip install 'stress[cluster]'"


class ClusterError(Exception):
    """The cluster cannot be used: Dask missing, scheduler unreachable, no or mismatched workers."""


# --- sub-snapshots ----------------------------------------------------------------------------


def take_accounts(snap: Snapshot, idx: Any) -> Snapshot:
    """The snapshot with accounts ``idx`` only (strictly increasing account indices).

    Keeps ``account_ids`` and ``balances`` rows of those accounts and their positions, with
    ``pos_account`` renumbered ``0 .. len(idx) - 1``; positions stay sorted by (account,
    instrument) because ``idx`` is increasing. Instruments, market, parameters, the fund and
    the configuration are the exchange's (they are small and every pass reads them).
    """
    idx = np.asarray(idx, np.int64)
    n = snap.n_accounts
    if idx.ndim != 1 or (len(idx) and (idx[0] < 0 or idx[-1] >= n)) or np.any(np.diff(idx) <= 0):
        raise ValueError(f"account indices must be strictly increasing, within 0 .. {n - 1}")
    new = np.full(n, -1, np.int64)  # old account index -> new, -1: not taken
    new[idx] = np.arange(len(idx))
    at = new[snap.pos_account]
    keep = at >= 0
    rows, n_groups = engine.group_rows(snap)  # groups span parts: keep the exchange's numbering
    return dataclasses.replace(
        snap,
        account_group=None if snap.account_group is None else snap.account_group[idx],
        group_index=(rows[idx], n_groups),
        account_ids=snap.account_ids[idx],
        balances=snap.balances[idx],
        pos_account=at[keep].astype(snap.pos_account.dtype),
        pos_instrument=snap.pos_instrument[keep],
        pos_quantity=snap.pos_quantity[keep],
        pos_entry_price=snap.pos_entry_price[keep],
    )


def split_accounts(snap: Snapshot, parts: int) -> list[np.ndarray]:
    """At most ``parts`` contiguous, non-empty ranges of account index covering every account.

    Cut so that each range holds about the same ``accounts + positions`` (what a sweep costs
    grows with both), never empty; fewer ranges than asked when there are fewer accounts.
    """
    n = snap.n_accounts
    if n == 0:
        return [np.arange(0)]
    parts = max(1, min(int(parts), n))
    work = np.cumsum(1 + np.bincount(snap.pos_account, minlength=n))  # [n] cumulative
    targets = work[-1] * np.arange(1, parts) / parts
    cuts = np.unique(np.clip(np.searchsorted(work, targets) + 1, 1, n - 1)) if parts > 1 else []
    return [r for r in np.split(np.arange(n), cuts) if len(r)]


def _to_host(x: Any) -> Any:
    """A pytree with NumPy leaves (what is pickled to workers: no device buffers), same type."""
    return jax.device_get(x)


def _host_snapshot(snap: Snapshot) -> Snapshot:
    """The snapshot with its pytree parts (market, instruments, parameters) as NumPy."""
    return dataclasses.replace(snap, market=_to_host(snap.market), instruments=_to_host(snap.instruments),
                               params=_to_host(snap.params))


# --- what runs on a worker ----------------------------------------------------------------------
# Plain module functions, pickled by reference: a worker imports ``stress.cluster``, hence
# ``stress._tree``, which turns float64 on before any array is made there.


def _worker_info() -> dict:
    """What a worker runs: the versions of stress and JAX, and whether JAX computes in float64."""
    import stress

    return {"version": stress.__version__, "jax": jax.__version__, "x64": bool(jax.config.jax_enable_x64)}


def _device_tables(t: engine.Tables) -> engine.Tables:
    """Tables received as NumPy, on this worker's default device (same dataclass, same dtypes)."""
    return jax.tree.map(jnp.asarray, t)


def _closed_part(sub: Snapshot, t: engine.Tables, chunk_size: int, dtype: str) -> np.ndarray:
    """Pass 1 of the price impact on one partition: ``[T, 2, n_impact, K*W]`` contracts closed."""
    return engine.LocalAccounts(sub, chunk_size, engine.DTYPES[dtype]).closed(_device_tables(t))


def _sweep_part(sub: Snapshot, t: engine.Tables, chunk_size: int, dtype: str, n_random: int,
                with_pnl: bool, level: float) -> engine.Partial:
    """One pass of ``engine.chunk_kernel`` over one partition's accounts."""
    return engine.LocalAccounts(sub, chunk_size, engine.DTYPES[dtype]).sweep(_device_tables(t), n_random, with_pnl, level)


def _adl_part(sub: Snapshot, t: engine.Tables, chunk_size: int, dtype: str, deficit: np.ndarray,
              terms: tuple) -> tuple:
    """``engine.adl_candidates`` of one partition (``terms``: its slices of the ranking terms)."""
    return engine.LocalAccounts(sub, chunk_size, engine.DTYPES[dtype]).adl(_device_tables(t), deficit, *terms)


class CascadePart:
    """One partition's accounts on its worker, for a liquidation cascade's steps: a Dask actor,
    so its state (``cascade.Part``: the laid-out holdings, built at the first tile, and the
    current tile's first-breach steps) stays on the worker between calls. Each call is one
    message, through the scheduler, or straight to the worker where the client was made with
    ``direct_to_workers=True``."""

    def __init__(self, sub: Snapshot, chunk_size: int | None, dtype: str):
        self.laid_out = cascade.part_of(sub, chunk_size, dtype)
        self.part = None

    def begin(self, W2: int, K: int) -> None:
        self.part = cascade.part_begin(self.laid_out, W2, K)

    def step(self, t: int, acc: dict, K: int, lag: int) -> tuple:
        self.part, out = cascade.part_step(self.part, t, acc, K, lag)
        return out

    def settle(self, tab: dict, fee_rate: float, K: int, lag: int, with_accounts: bool) -> tuple:
        out = cascade.part_settle(self.part, tab, fee_rate, K, lag, with_accounts)
        self.part = None
        return out


# --- the client side ----------------------------------------------------------------------------


def connect(address: str, timeout: float | None = None) -> Any:
    """A ``distributed.Client`` of the scheduler at ``address`` (``tcp://host:8786``).

    Raises ``ClusterError`` with one sentence when Dask is not installed or the scheduler
    cannot be reached within ``timeout`` seconds (default ``CONNECT_TIMEOUT``).
    """
    try:
        from distributed import Client
    except ImportError:
        raise ClusterError(f"a cluster needs Dask distributed: {INSTALL_HINT}") from None
    try:
        # a malformed address first: Client raises for it from its constructor, and the
        # half-built client it leaves then waits 20 s at exit and prints a traceback
        _check_address(address)
        return Client(address, timeout=timeout or CONNECT_TIMEOUT, set_as_default=False)
    except Exception as exc:  # OSError (unreachable, timed out), ValueError (malformed address)
        raise ClusterError(f"cannot reach a Dask scheduler at {address!r}: {exc}") from None


def _check_address(address: str) -> None:
    """A ``ValueError`` unless ``address`` is ``[protocol://]host:port`` of a protocol Dask has."""
    from distributed.comm.addressing import parse_address, parse_host_port
    from distributed.comm.registry import get_backend

    scheme, location = parse_address(address)
    get_backend(scheme)  # "unknown address scheme ..."; loads a backend a package registers (ucxx)
    if scheme != "inproc":
        parse_host_port(location)  # "missing port number in address ..."


class ClusterAccounts:
    """Sweeps every account of ``snap`` on a Dask cluster: the sweeper of ``engine.run``.

    Args:
      snap: the snapshot. client: a ``distributed.Client``.
      partitions: how many account partitions (default: one per worker, so each worker runs
        one pass of the single-machine engine over all its devices; more partitions than
        workers are placed round-robin and run in turn).
      chunk_size: accounts per chunk on the workers (results do not depend on it).
      dtype: ``"float64"`` or ``"float32"``; must be the run's (``engine.run(dtype=...)``).
      progress: called on the client as ``progress(accounts_done, accounts_total)`` as
        partitions finish.

    Each worker receives its partitions' sub-snapshots once, here; ``close`` (or leaving a
    ``with`` block) releases them.
    """

    def __init__(self, snap: Snapshot, client: Any, *, partitions: int | None = None,
                 chunk_size: int | None = None, dtype: str = "float64",
                 progress: Callable[[int, int], None] | None = None):
        if dtype not in engine.DTYPES:
            raise ValueError(f"dtype {dtype!r}: expected one of {', '.join(engine.DTYPES)}")
        self.snap, self.client, self.chunk_size, self.dtype, self.progress = snap, client, chunk_size, dtype, progress
        workers = _check_workers(client)
        self.index = split_accounts(snap, partitions or len(workers))
        self.workers = [workers[k % len(workers)] for k in range(len(self.index))]
        host = _host_snapshot(snap)
        # one scatter per partition, to the worker that will sweep it, so it is sent once
        self._subs = [client.scatter(take_accounts(host, idx), workers=[w], hash=False)
                      for idx, w in zip(self.index, self.workers)]
        self._actors: list = []  # CascadePart per partition, made by a run's first cascade tile
        self._actor_futures: list = []

    def __enter__(self) -> "ClusterAccounts":
        return self

    def __exit__(self, *exc: Any) -> None:
        self.close()

    def close(self) -> None:
        """Release the sub-snapshots (and any cascade state) held on the workers."""
        if self._actor_futures:
            self.client.cancel(self._actor_futures)
            self._actors, self._actor_futures = [], []
        if self._subs:
            self.client.cancel(self._subs)
            self._subs = []

    def closed(self, t: engine.Tables) -> np.ndarray:
        """Pass 1 of the price impact: ``[T, 2, n_impact, K*W]`` net and gross contracts closed,
        summed over partitions (in partition order, so the result is deterministic)."""
        parts = self._map(_closed_part, t)
        return np.sum(np.stack([np.asarray(p, np.float64) for p in parts]), axis=0)

    def adl(self, t: engine.Tables, deficit: np.ndarray, *terms: np.ndarray) -> tuple[np.ndarray, ...]:
        """``engine.adl_candidates`` over every partition: each worker sends only its candidates
        (a prefix of its winners per deficit scenario), with rows made exchange-wide."""
        parts = self._map(_adl_part, t, deficit, per_part=[tuple(x[idx] for x in terms) for idx in self.index])
        col, _, *rest = (np.concatenate(x) for x in zip(*parts))
        rows = np.concatenate([idx[p[1]] for idx, p in zip(self.index, parts)])
        return (col, rows, *rest)

    def sweep(self, t: engine.Tables, n_random: int, with_pnl: bool, level: float = engine.VAR_LEVEL) -> engine.Partial:
        """One pass of every account through ``engine.chunk_kernel``, merged over partitions."""
        parts = self._map(_sweep_part, t, n_random, with_pnl, level)
        return engine.merge(parts, self.index, self.snap.n_accounts)

    # Liquidation cascades (``stress.cascade.run(parts=self)``): the client drives each tile of
    # paths a step at a time; each partition's worker holds its accounts' state in an actor
    # (``CascadePart``) and sends back the contracts its accounts closed at the step.

    def cascade_begin(self, *, W2: int, K: int, lag: int, fee_rate: float, dtype: str) -> None:
        """A new tile of ``W2`` columns: every partition's accounts before its first step."""
        if dtype != self.dtype:
            raise ValueError(f"the cascade runs in {dtype}, the cluster sweeper in {self.dtype}: "
                             "give engine.run and ClusterAccounts the same dtype")
        self._cascade = (K, lag, fee_rate)
        if not self._actors:  # at the first tile, kept until close(): holdings laid out once
            futures = [self.client.submit(CascadePart, sub, self.chunk_size, self.dtype, actor=True,
                                          workers=[w], allow_other_workers=False, pure=False)
                       for sub, w in zip(self._subs, self.workers)]
            try:
                with self.client.as_current():  # an actor binds to the current client, not the default
                    self._actors = [f.result() for f in futures]
            except BaseException:
                self.client.cancel(futures)
                raise
            self._actor_futures = futures
        self._on_every_part(lambda a: a.begin(W2, K))

    def cascade_step(self, t: int, acc: dict) -> tuple[np.ndarray, np.ndarray]:
        """Step ``t`` on every partition: contracts closed ``[2, I, W2]`` and accounts closed
        ``[W2]``, added over partitions in partition order."""
        K, lag, _ = self._cascade
        return cascade.add_steps(self._on_every_part(lambda a: a.step(t, acc, K, lag)))

    def cascade_settle(self, tab: dict, with_accounts: bool) -> tuple[np.ndarray, np.ndarray | None]:
        """After the last step: sums ``[len(SUMS), W2]`` over every partition and, with
        ``with_accounts``, every account's close-out step ``[n, W2]``."""
        K, lag, fee_rate = self._cascade
        got = self._on_every_part(lambda a: a.settle(tab, fee_rate, K, lag, with_accounts))
        return cascade.add_settled(got, self.index, self.snap.n_accounts, with_accounts)

    def _on_every_part(self, call: Callable) -> list:
        """``call(actor)`` on every partition's actor at once; the results in partition order."""
        with self.client.as_current():
            return [f.result() for f in [call(a) for a in self._actors]]

    def _map(self, fn: Callable, t: engine.Tables, *args: Any, per_part: list | None = None) -> list:
        """``fn(sub_snapshot, tables, chunk_size, dtype, *args[, per_part[k]])`` on every
        partition's worker; results in partition order. The tables go to each worker once per
        pass."""
        from distributed import as_completed

        if self.progress is not None:
            self.progress(0, self.snap.n_accounts)
        if np.dtype(t.value.dtype) != np.dtype(engine.DTYPES[self.dtype]):
            raise ValueError(f"tables are {np.dtype(t.value.dtype).name}, the cluster sweeper {self.dtype}: "
                             "give engine.run and ClusterAccounts the same dtype")
        tables = self.client.scatter(_to_host(t), workers=sorted(set(self.workers)), broadcast=True, hash=False)
        try:
            extra = [()] * len(self._subs) if per_part is None else [(x,) for x in per_part]
            futures = [self.client.submit(fn, sub, tables, self.chunk_size, self.dtype, *args, *e,
                                          workers=[w], allow_other_workers=True, pure=False)
                       for sub, w, e in zip(self._subs, self.workers, extra)]
            size = {f.key: len(idx) for f, idx in zip(futures, self.index)}
            done = 0
            for f in as_completed(futures, loop=self.client.loop):  # this client's, not a default one
                if f.status == "error":
                    f.result()  # raises the worker's exception here, as a local run would
                done += size[f.key]
                if self.progress is not None:
                    self.progress(done, self.snap.n_accounts)
            return self.client.gather(futures)
        finally:
            self.client.cancel([tables])


def _check_workers(client: Any) -> list[str]:
    """The addresses of the cluster's workers, sorted; each must run this version of stress and JAX.

    Waits up to ``CONNECT_TIMEOUT`` for a first worker. Raises ``ClusterError`` when none
    comes, or when a worker cannot import ``stress`` or has other versions of it or of JAX.
    """
    import stress

    if not client.scheduler_info()["workers"]:
        try:
            client.wait_for_workers(1, timeout=CONNECT_TIMEOUT)
        except Exception:  # TimeoutError (or OSError if the scheduler went away meanwhile)
            raise ClusterError(f"the scheduler has no workers (waited {CONNECT_TIMEOUT:g} s): start some with "
                               f"`dask worker {client.scheduler.address}`") from None
    info = client.run(_worker_info, on_error="return")
    for addr, got in sorted(info.items()):
        if isinstance(got, Exception):
            raise ClusterError(f"worker {addr} cannot run stress ({type(got).__name__}: {got}); "
                               f"install stress {stress.__version__} there")
        if got["version"] != stress.__version__ or got["jax"] != jax.__version__:  # other kernels, other numbers
            raise ClusterError(f"worker {addr} runs stress {got['version']} on jax {got['jax']}, "
                               f"this client stress {stress.__version__} on jax {jax.__version__}")
        if not got["x64"]:  # reports are float64; a worker in float32 would round every column
            raise ClusterError(f"worker {addr} has JAX's float64 turned off")
    return sorted(info)


def run(snap: Snapshot, scen: Scenarios, address_or_client: Any, *, partitions: int | None = None,
        chunk_size: int | None = None, dtype: str = "float64",
        progress: Callable[[int, int], None] | None = None) -> engine.Result:
    """``engine.run`` with the accounts swept on a Dask cluster; the same ``Result``.

    ``address_or_client``: a scheduler address (``"tcp://host:8786"``: connected here and
    closed at the end) or a ``distributed.Client`` (left open). Other arguments as
    ``ClusterAccounts`` and ``engine.run``.
    """
    own = isinstance(address_or_client, str)
    client = connect(address_or_client) if own else address_or_client
    try:
        with ClusterAccounts(snap, client, partitions=partitions, chunk_size=chunk_size, dtype=dtype,
                             progress=progress) as sweeper:
            return engine.run(snap, scen, chunk_size=chunk_size, dtype=dtype, sweeper=sweeper)
    finally:
        if own:
            client.close()
