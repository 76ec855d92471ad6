"""The node's ledger: per-minute history in an embedded SQLite file (stdlib `sqlite3`, WAL).

Why a ledger next to the Prometheus counters: counters live in memory, lose a gone pod's series,
and book the first 30 minutes of an idle streak as active (the live state waits for the window
before it alerts). The ledger is the accounting record (DESIGN §4): every dollar the evaluator
accrues is booked per wall-clock minute, per unit × holder, with seconds and dollars by state;
a confirmed idle streak is rebooked as idle from its first idle sample; and the counters resume
from it after a restart.

Nothing waits on disk: the agent thread only aggregates the current minute in memory and hands
finished minutes to a writer thread through a bounded queue. A full or read-only disk is logged
once per cause and counted (`gpucap_history_write_errors_total`); a corrupt file at start is moved
aside and a fresh one started; SIGKILL loses at most the minutes not yet written (WAL keeps the
file readable). Retention (default 35 days) and a size bound (default 512 MiB) drop the oldest
minutes first. The schema is versioned (`meta.schema_version`) with a migration step per version.
"""

from __future__ import annotations

import logging
import math
import os
import queue
import sqlite3
import threading
import time
from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field
from typing import Any

from agent.model import STATES, AgentState, Owner, UnitView

log = logging.getLogger("gpucap.history")

SCHEMA_VERSION = 1
QUEUE_ITEMS = 4096

_UNIT_KEY = ("minute", "uuid", "namespace", "pod", "container")
_UNIT_INFO = ("node", "gpu", "gpu_instance", "mig_profile", "model", "kind", "workload_kind", "workload", "team",
              "feature", "pod_uid", "instance_type", "capacity_type", "price_source", "hourly_price",
              "list_hourly_price", "gpu_fraction")
_STATE_COLS = tuple(f"s_{s}" for s in STATES) + tuple(f"d_{s}" for s in STATES)
_UNIT_STATS = ("act_sum", "act_samples", "act_max", "act_p95", "mem_max", "mem_total")
_PENDING = ("pending_streak", "pending_seconds", "pending_dollars")
UNIT_COLUMNS = _UNIT_KEY + _UNIT_INFO + _STATE_COLS + _UNIT_STATS + _PENDING

_SERVER_KEY = ("minute", "namespace", "pod", "server", "model")
_SERVER_INFO = ("node", "workload_kind", "workload", "team", "feature")
_SERVER_VALUES = ("queue_max", "queue_sum", "running_max", "kv_max", "successes", "failures", "tokens",
                  "saturated_seconds", "samples") + tuple(f"d_{s}" for s in STATES)
SERVER_COLUMNS = _SERVER_KEY + _SERVER_INFO + _SERVER_VALUES

_SCHEMA_V1 = f"""
CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS unit_minutes (
  minute INTEGER NOT NULL, uuid TEXT NOT NULL, namespace TEXT NOT NULL, pod TEXT NOT NULL, container TEXT NOT NULL,
  node TEXT, gpu TEXT, gpu_instance TEXT, mig_profile TEXT, model TEXT, kind TEXT, workload_kind TEXT,
  workload TEXT, team TEXT, feature TEXT, pod_uid TEXT, instance_type TEXT, capacity_type TEXT, price_source TEXT,
  hourly_price REAL, list_hourly_price REAL, gpu_fraction REAL,
  {", ".join(f"{c} REAL NOT NULL DEFAULT 0" for c in _STATE_COLS)},
  act_sum REAL, act_samples INTEGER, act_max REAL, act_p95 REAL, mem_max INTEGER, mem_total INTEGER,
  pending_streak REAL, pending_seconds REAL NOT NULL DEFAULT 0, pending_dollars REAL NOT NULL DEFAULT 0,
  PRIMARY KEY (minute, uuid, namespace, pod, container));
CREATE TABLE IF NOT EXISTS server_minutes (
  minute INTEGER NOT NULL, namespace TEXT NOT NULL, pod TEXT NOT NULL, server TEXT NOT NULL, model TEXT NOT NULL,
  node TEXT, workload_kind TEXT, workload TEXT, team TEXT, feature TEXT,
  queue_max REAL, queue_sum REAL, running_max REAL, kv_max REAL, successes REAL, failures REAL, tokens REAL,
  saturated_seconds REAL, samples INTEGER, {", ".join(f"d_{s} REAL NOT NULL DEFAULT 0" for s in STATES)},
  PRIMARY KEY (minute, namespace, pod, server, model));
CREATE TABLE IF NOT EXISTS node_minutes (
  minute INTEGER NOT NULL, node TEXT NOT NULL, seconds REAL NOT NULL, dollars REAL NOT NULL,
  PRIMARY KEY (minute, node));
CREATE TABLE IF NOT EXISTS counters (
  node TEXT, gpu TEXT, gpu_instance TEXT, mig_profile TEXT, uuid TEXT, model TEXT,
  namespace TEXT, pod TEXT, container TEXT, workload_kind TEXT, workload TEXT, team TEXT, pod_uid TEXT,
  feature TEXT, state TEXT, dollars REAL NOT NULL, last_minute INTEGER NOT NULL,
  PRIMARY KEY (uuid, namespace, pod, container, pod_uid, state));
"""
# one step per schema version: MIGRATIONS[n] takes a database at version n to n + 1
MIGRATIONS: dict[int, str] = {}


@dataclass(frozen=True, slots=True)
class HourRow:
    """One UTC hour × unit × holder × state, from the node's ledger (FOCUS rows, cost reports)."""

    hour: int
    node: str
    gpu: str
    gpu_instance: str
    mig_profile: str
    uuid: str
    model: str
    kind: str
    namespace: str
    pod: str
    container: str
    workload_kind: str
    workload: str
    team: str
    feature: str
    instance_type: str
    capacity_type: str
    price_source: str
    hourly_price: float
    list_hourly_price: float
    state: str
    seconds: float
    dollars: float
    activity_mean: float | None
    activity_p95: float | None
    memory_max_bytes: int | None
    gpu_fraction: float = 1.0


# --------------------------------------------------------------------------------- in memory
@dataclass
class _UnitMinute:
    info: dict[str, Any]
    states: dict[str, float] = field(default_factory=dict)  # s_* and d_*
    acts: list[float] = field(default_factory=list)
    mem_max: int | None = None
    pending_streak: float | None = None
    pending_seconds: float = 0.0
    pending_dollars: float = 0.0

    def row(self, key: tuple) -> tuple:
        acts = sorted(self.acts)
        p95 = acts[min(len(acts) - 1, math.ceil(0.95 * len(acts)) - 1)] if acts else None
        stats = (sum(acts) if acts else None, len(acts), acts[-1] if acts else None, p95, self.mem_max,
                 self.info.get("mem_total"))
        return (key + tuple(self.info.get(k) for k in _UNIT_INFO) + tuple(self.states.get(c, 0.0) for c in _STATE_COLS)
                + stats + (self.pending_streak, self.pending_seconds, self.pending_dollars))


@dataclass
class _ServerMinute:
    info: dict[str, Any]
    values: dict[str, float] = field(default_factory=dict)

    def row(self, key: tuple) -> tuple:
        return key + tuple(self.info.get(k) for k in _SERVER_INFO) + tuple(self.values.get(c, 0.0) for c in
                                                                              _SERVER_VALUES)


def _minute(t: float) -> int:
    return int(t // 60) * 60


def _split(start: float, end: float) -> Iterator[tuple[int, float]]:
    """(minute, seconds of [start, end) in it): an interval that crosses minutes is booked in each."""
    t = start
    while t < end - 1e-9:
        m = _minute(t)
        nxt = min(end, m + 60.0)
        yield m, nxt - t
        t = nxt


def _owner_key(view: UnitView) -> tuple[str, str, str]:
    o = view.row.owner
    return (o.namespace, o.pod, o.container)


def _unit_info(view: UnitView, node: str) -> dict[str, Any]:
    r, o = view.row, view.row.owner
    parent = r.parent_hourly_price or 0.0
    return {"node": node, "gpu": str(r.gpu), "gpu_instance": r.gpu_instance, "mig_profile": r.mig_profile,
            "model": r.model, "kind": r.kind, "workload_kind": o.workload_kind, "workload": o.workload, "team": o.team,
            "feature": o.feature, "pod_uid": o.pod_uid, "instance_type": r.instance_type,
            "capacity_type": r.capacity_type, "price_source": r.price_source, "hourly_price": r.hourly_price,
            "list_hourly_price": r.hourly_price / parent * r.list_parent_price if parent else r.hourly_price,
            "gpu_fraction": r.hourly_price / parent if parent else 1.0, "mem_total": r.memory_total_bytes}


class Ledger:
    """Aggregates evaluations into minute rows (agent thread, no I/O); a `HistoryWriter` stores them."""

    def __init__(self, node: str, sink: Any) -> None:
        self.node = node
        self.sink = sink  # .put(kind, payload)
        self._units: dict[tuple, _UnitMinute] = {}
        self._servers: dict[tuple, _ServerMinute] = {}
        self._node_minutes: dict[int, list[float]] = {}
        self._confirmed: set[tuple[str, tuple[str, str, str], float]] = set()
        self._counters: dict[tuple, float] = {}
        self._last_server: dict[tuple, tuple[float, float, float, float]] = {}
        self._current: int | None = None

    def observe(self, st: AgentState) -> None:
        node = st.node.name or self.node
        for a in st.accruals:
            self._book(a, node)
        # the node was observed over each interval once, whatever the number of units
        for start, end in {(a.start, a.end) for a in st.accruals}:
            for minute, secs in _split(start, end):
                self._node_minutes.setdefault(minute, [0.0, 0.0])[0] += secs
        for v in st.units:
            self._sample(v, st.time, node)
            if v.state == "idle_reserved" and v.streak is not None:
                key = (v.row.uuid, _owner_key(v), v.streak)
                if key not in self._confirmed:
                    self._confirmed.add(key)
                    self._rebook(v.row.uuid, _owner_key(v), v.streak)
        live = {(v.row.uuid, _owner_key(v), v.streak) for v in st.units if v.streak is not None}
        self._confirmed &= live
        self._serving(st, node)
        self._counters = {(labels, owner, state): d for labels, owner, state, d in st.costs}
        minute = _minute(st.time)
        if self._current is not None and minute > self._current:
            self.flush(before=minute)
        self._current = minute if self._current is None else max(self._current, minute)

    def _book(self, a: Any, node: str) -> None:
        for minute, secs in _split(a.start, a.end):
            frac = secs / a.seconds if a.seconds > 0 else 0.0
            key = (minute, a.view.row.uuid) + _owner_key(a.view)
            um = self._units.get(key)
            if um is None:
                um = self._units[key] = _UnitMinute(_unit_info(a.view, node))
            dollars = a.dollars * frac
            um.states[f"s_{a.state}"] = um.states.get(f"s_{a.state}", 0.0) + secs
            um.states[f"d_{a.state}"] = um.states.get(f"d_{a.state}", 0.0) + dollars
            if a.streak is not None:
                if um.pending_streak != a.streak:
                    um.pending_streak, um.pending_seconds, um.pending_dollars = a.streak, 0.0, 0.0
                um.pending_seconds += secs
                um.pending_dollars += dollars
            self._node_minutes.setdefault(minute, [0.0, 0.0])[1] += dollars

    def _sample(self, v: UnitView, now: float, node: str) -> None:
        key = (_minute(now), v.row.uuid) + _owner_key(v)
        um = self._units.get(key)
        if um is None:
            um = self._units[key] = _UnitMinute(_unit_info(v, node))
        if v.row.activity is not None and v.state in ("active", "idle_reserved") and len(um.acts) < 240:
            um.acts.append(v.row.activity)
        mem = v.row.memory_used_bytes
        if mem is not None:
            um.mem_max = mem if um.mem_max is None else max(um.mem_max, mem)

    def _rebook(self, uuid: str, owner: tuple[str, str, str], streak: float) -> None:
        """A confirmed idle streak is idle from its first idle sample: move its active time."""
        for key, um in self._units.items():
            if key[1] == uuid and key[2:] == owner and um.pending_streak == streak:
                _move(um.states, um.pending_seconds, um.pending_dollars)
                um.pending_streak, um.pending_seconds, um.pending_dollars = None, 0.0, 0.0
        self.sink.put("rebook", (uuid, owner, streak))

    def _serving(self, st: AgentState, node: str) -> None:
        minute = _minute(st.time)
        dt = max((a.seconds for a in st.accruals), default=0.0)
        # the pod's dollars of this interval, by minute (the same split as the unit rows) and state
        pod_dollars: dict[tuple[str, str], dict[tuple[int, str], float]] = {}
        for a in st.accruals:
            o = a.view.row.owner
            if o.pod:
                d = pod_dollars.setdefault((o.namespace, o.pod), {})
                for m, secs in _split(a.start, a.end):
                    k = (m, a.state)
                    d[k] = d.get(k, 0.0) + a.dollars * (secs / a.seconds if a.seconds > 0 else 0.0)
        pod_hourly: dict[tuple[str, str], float] = {}
        for v in st.units:
            o = v.row.owner
            if o.pod:
                pod_hourly[(o.namespace, o.pod)] = pod_hourly.get((o.namespace, o.pod), 0.0) + v.row.hourly_price
        for i in st.inference:
            o = i.owner
            key = (minute, o.namespace, o.pod, i.server, i.model)
            sm = self._servers.get(key)
            if sm is None:
                sm = self._servers[key] = _ServerMinute({"node": node, "workload_kind": o.workload_kind,
                                                         "workload": o.workload, "team": o.team,
                                                         "feature": o.feature})
            val = sm.values
            val["samples"] = val.get("samples", 0) + 1
            for col, x in (("queue_max", i.queue_requests), ("running_max", i.running_requests),
                           ("kv_max", i.kv_cache_usage_ratio)):
                if x is not None:
                    val[col] = max(val.get(col, 0.0), x)
            val["queue_sum"] = val.get("queue_sum", 0.0) + (i.queue_requests or 0.0)
            if i.saturated:
                val["saturated_seconds"] = val.get("saturated_seconds", 0.0) + dt
            ek = (o.namespace, o.pod, i.server, i.model, i.url)
            totals = (i.successful_requests_total or 0.0, i.failed_requests_total or 0.0,
                      i.generated_tokens_total or 0.0)
            prev = self._last_server.get(ek)
            if prev is not None:
                for col, now_v, then_v in zip(("successes", "failures", "tokens"), totals, prev):
                    val[col] = val.get(col, 0.0) + max(0.0, now_v - then_v)
            self._last_server[ek] = (*totals, st.time)
            # this entry's share of its pod's dollars this interval, by state (DESIGN §4 split)
            hourly = pod_hourly.get((o.namespace, o.pod), 0.0)
            frac = i.hourly_cost / hourly if hourly > 0 else 0.0
            for (m, state), dollars in pod_dollars.get((o.namespace, o.pod), {}).items():
                target = sm
                if m != minute:
                    mkey = (m, o.namespace, o.pod, i.server, i.model)
                    target = self._servers.get(mkey) or self._servers.setdefault(mkey, _ServerMinute(dict(sm.info)))
                target.values[f"d_{state}"] = target.values.get(f"d_{state}", 0.0) + dollars * frac
        if len(self._last_server) > 4096:
            cutoff = st.time - 3600
            self._last_server = {k: v for k, v in self._last_server.items() if v[3] >= cutoff}

    def flush(self, before: int | None = None) -> None:
        """Hand every minute before `before` (all when None) to the writer."""
        done = [k for k in self._units if before is None or k[0] < before]
        units = [self._units.pop(k).row(k) for k in sorted(done)]
        sdone = [k for k in self._servers if before is None or k[0] < before]
        servers = [self._servers.pop(k).row(k) for k in sorted(sdone)]
        ndone = [m for m in self._node_minutes if before is None or m < before]
        nodes = [(m, self.node, *self._node_minutes.pop(m)) for m in sorted(ndone)]
        last = max([r[0] for r in units] + [0])
        counters = [(*labels, *owner.labels(), owner.pod_uid, owner.feature, state, d, last)
                    for (labels, owner, state), d in self._counters.items()]
        if units or servers or nodes:
            self.sink.put("minutes", (units, servers, nodes, counters))


def _move(states: dict[str, float], seconds: float, dollars: float) -> None:
    states["s_active"] = states.get("s_active", 0.0) - seconds
    states["d_active"] = states.get("d_active", 0.0) - dollars
    states["s_idle_reserved"] = states.get("s_idle_reserved", 0.0) + seconds
    states["d_idle_reserved"] = states.get("d_idle_reserved", 0.0) + dollars


# --------------------------------------------------------------------------------- on disk
def _connect(path: str, readonly: bool = False) -> sqlite3.Connection:
    if readonly:
        conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True, timeout=5.0, check_same_thread=False)
    else:
        conn = sqlite3.connect(path, timeout=5.0, check_same_thread=False)
        # before WAL: a new file's header fixes auto_vacuum when the journal mode is first written, and
        # without it the file never shrinks below its largest size (the size bound counts used pages)
        conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
        conn.execute("PRAGMA journal_mode=WAL")
        conn.execute("PRAGMA synchronous=NORMAL")
        conn.execute(f"PRAGMA journal_size_limit={WAL_LIMIT_BYTES}")  # the WAL is cut back after checkpoints
    return conn


def open_store(path: str) -> sqlite3.Connection:
    """Open (creating or migrating) the ledger; a corrupt file is moved aside and a fresh one started."""
    os.makedirs(os.path.dirname(os.path.abspath(path)) or ".", exist_ok=True)
    try:
        conn = _connect(path)
        _prepare(conn)
        return conn
    except sqlite3.DatabaseError as e:
        if isinstance(e, sqlite3.OperationalError) and "readonly" not in str(e) and "corrupt" not in str(e) \
                and "not a database" not in str(e) and "malformed" not in str(e):
            raise
        aside = f"{path}.corrupt-{int(time.time())}"
        log.error("history %s is unreadable (%s): moved aside to %s, starting a fresh ledger", path, e, aside)
        for suffix in ("", "-wal", "-shm"):
            try:
                os.replace(path + suffix, aside + suffix)
            except FileNotFoundError:
                pass
        conn = _connect(path)
        _prepare(conn)
        return conn


def _prepare(conn: sqlite3.Connection) -> None:
    check = conn.execute("PRAGMA quick_check").fetchone()
    if check is None or check[0] != "ok":
        raise sqlite3.DatabaseError(f"quick_check: {check[0] if check else 'no answer'} (database disk image is "
                                    "malformed)")
    conn.executescript(_SCHEMA_V1)
    row = conn.execute("SELECT value FROM meta WHERE key='schema_version'").fetchone()
    version = int(row[0]) if row else 0
    if version == 0:
        conn.execute("INSERT OR REPLACE INTO meta VALUES ('schema_version', ?)", (str(SCHEMA_VERSION),))
        version = SCHEMA_VERSION
    if version > SCHEMA_VERSION:
        raise sqlite3.DatabaseError(f"schema version {version} is newer than this gpucap ({SCHEMA_VERSION}): corrupt")
    while version < SCHEMA_VERSION:
        conn.executescript(MIGRATIONS[version])
        version += 1
        conn.execute("UPDATE meta SET value=? WHERE key='schema_version'", (str(version),))
    conn.commit()
    if conn.execute("PRAGMA auto_vacuum").fetchone()[0] == 0:
        # a ledger written before incremental vacuum was on: rewritten once, so it can shrink
        try:
            conn.execute("PRAGMA auto_vacuum=INCREMENTAL")
            conn.execute("VACUUM")
            log.info("history: converted to incremental vacuum (the file can now shrink to its size bound)")
        except sqlite3.Error as e:  # e.g. no room for the copy VACUUM writes: keep the file as it is
            log.warning("history: could not convert to incremental vacuum (%s); the file will not shrink", e)


WAL_LIMIT_BYTES = 8 * 2**20  # what a checkpointed WAL file is cut back to
BATCH_ITEMS = 64  # queue items (minutes) per transaction
BLOCK_TIMEOUT_S = 30.0  # how long a blocking put waits for a stuck disk before it drops and counts
COUNTER_KEEP_S = 86400  # counters rows of series gone this long are deleted (see analytics.DORMANT_KEEP_S)
FREE_PAGES_KEPT = 256  # free pages (1 MiB) left for reuse before they are given back

_UPSERT_UNITS = (
    f"INSERT INTO unit_minutes ({', '.join(UNIT_COLUMNS)}) VALUES ({', '.join('?' * len(UNIT_COLUMNS))}) "
    "ON CONFLICT (minute, uuid, namespace, pod, container) DO UPDATE SET "
    + ", ".join(f"{c}={c}+excluded.{c}" for c in _STATE_COLS + ("act_sum", "act_samples"))
    + ", act_max=max(coalesce(act_max, excluded.act_max), coalesce(excluded.act_max, act_max))"
    + ", act_p95=max(coalesce(act_p95, excluded.act_p95), coalesce(excluded.act_p95, act_p95))"
    + ", mem_max=max(coalesce(mem_max, excluded.mem_max), coalesce(excluded.mem_max, mem_max))"
    + ", pending_streak=excluded.pending_streak, pending_seconds=excluded.pending_seconds"
    + ", pending_dollars=excluded.pending_dollars"
)
_UPSERT_SERVERS = (
    f"INSERT INTO server_minutes ({', '.join(SERVER_COLUMNS)}) VALUES ({', '.join('?' * len(SERVER_COLUMNS))}) "
    "ON CONFLICT (minute, namespace, pod, server, model) DO UPDATE SET "
    + ", ".join(f"{c}={c}+excluded.{c}" for c in ("queue_sum", "successes", "failures", "tokens", "saturated_seconds",
                                                   "samples") + tuple(f"d_{s}" for s in STATES))
    + ", queue_max=max(queue_max, excluded.queue_max), running_max=max(running_max, excluded.running_max)"
    + ", kv_max=max(kv_max, excluded.kv_max)"
)
_UPSERT_NODES = ("INSERT INTO node_minutes VALUES (?, ?, ?, ?) ON CONFLICT (minute, node) DO UPDATE SET "
                 "seconds=seconds+excluded.seconds, dollars=dollars+excluded.dollars")
_UPSERT_COUNTERS = ("INSERT INTO counters VALUES (" + ", ".join("?" * 17) + ") "
                    "ON CONFLICT (uuid, namespace, pod, container, pod_uid, state) DO UPDATE SET "
                    "dollars=excluded.dollars, last_minute=excluded.last_minute")
_REBOOK = ("UPDATE unit_minutes SET s_active=s_active-pending_seconds, d_active=d_active-pending_dollars, "
           "s_idle_reserved=s_idle_reserved+pending_seconds, d_idle_reserved=d_idle_reserved+pending_dollars, "
           "pending_streak=NULL, pending_seconds=0, pending_dollars=0 "
           "WHERE uuid=? AND namespace=? AND pod=? AND container=? AND pending_streak=?")


class HistoryWriter:
    """The writer thread: the only code that touches the file while the agent runs."""

    def __init__(self, path: str, *, retention: float = 35 * 86400.0, max_bytes: int = 512 * 2**20,
                 clock: Any = None, block: bool = False) -> None:
        self.path = path
        self.retention = retention
        self.max_bytes = max_bytes
        # the bound is the file on disk: the WAL's room comes out of it (cut back to it at checkpoints)
        self.wal_bytes = min(WAL_LIMIT_BYTES, max_bytes // 8)
        self.block = block  # a headless fast-forward waits for the disk instead of dropping minutes
        self.clock = clock
        self.write_errors = 0
        self.dropped = 0
        self._queue: queue.Queue[tuple[str, Any]] = queue.Queue(maxsize=QUEUE_ITEMS)
        self._failed: list[tuple[str, Any]] = []  # kept for a retry while the disk refuses (bounded)
        self._last_error = ""
        self._ret_ref: float | None = None  # wall time retention is measured from (see _housekeeping)
        self._ret_mono = 0.0
        self._ret_last = 0.0  # the newest minute housekeeping has seen
        self._conn = open_store(path)
        self._conn.execute(f"PRAGMA journal_size_limit={self.wal_bytes}")
        self._thread = threading.Thread(target=self._run, name="gpucap-history", daemon=True)
        self._stop = threading.Event()
        self._idle = threading.Event()
        self._idle.set()
        self._thread.start()

    def put(self, kind: str, payload: Any) -> None:
        """Never blocks the daemon: a full queue drops the item and counts it (the disk is far behind).
        A headless fast-forward (`block`) produces minutes faster than any disk: it waits instead."""
        try:
            self._idle.clear()
            if self.block and self._thread.is_alive():
                self._queue.put((kind, payload), timeout=BLOCK_TIMEOUT_S)
            else:
                self._queue.put_nowait((kind, payload))
        except queue.Full:
            self.dropped += 1
            self.write_errors += 1

    def restore_counters(self) -> dict[tuple[tuple[str, ...], Owner, str], float]:
        rows = self._conn.execute("SELECT * FROM counters").fetchall()
        out = {}
        for r in rows:
            labels = tuple(r[0:6])
            owner = Owner(r[6], r[7], r[8], r[9], r[10], r[11], r[12], r[13])
            out[(labels, owner, r[14])] = float(r[15])
        return out

    def _run(self) -> None:
        while not self._stop.is_set() or not self._queue.empty():
            try:
                item = self._queue.get(timeout=0.2)
            except queue.Empty:
                self._idle.set()
                continue
            batch = self._failed + [item]
            while len(batch) < BATCH_ITEMS:  # one transaction each: the WAL grows with the largest one
                try:
                    batch.append(self._queue.get_nowait())
                except queue.Empty:
                    break
            self._failed = []
            self._write(batch)
            if self._queue.empty():
                self._idle.set()
        self._close_conn()  # the thread that uses the connection closes it (see close)

    def _write(self, batch: list[tuple[str, Any]]) -> None:
        try:
            # every item carries all live counters, the newest win: only the batch's last are written
            last_counters = next((p[3] for kind, p in reversed(batch) if kind == "minutes"), [])
            with self._conn:
                for kind, payload in batch:
                    if kind == "minutes":
                        units, servers, nodes, _ = payload
                        self._conn.executemany(_UPSERT_UNITS, units)
                        self._conn.executemany(_UPSERT_SERVERS, servers)
                        self._conn.executemany(_UPSERT_NODES, nodes)
                    elif kind == "rebook":
                        uuid, (ns, pod, container), streak = payload
                        self._conn.execute(_REBOOK, (uuid, ns, pod, container, streak))
                self._conn.executemany(_UPSERT_COUNTERS, last_counters)
            try:
                self._housekeeping(batch)
            except sqlite3.Error as e:  # the batch is committed: never write it again
                self.write_errors += 1
                log.warning("history housekeeping on %s failed: %s", self.path, e)
            if self._last_error:
                log.info("history %s writable again", self.path)
                self._last_error = ""
        except sqlite3.Error as e:
            self.write_errors += 1
            cause = f"{type(e).__name__}: {e}"
            if cause != self._last_error:
                log.error("history write to %s failed (%s); /metrics keeps serving, retrying", self.path, cause)
                self._last_error = cause
            self._failed = batch[-512:]  # bounded: minutes older than that are lost, and counted
            self.dropped += max(0, len(batch) - 512)

    def _housekeeping(self, batch: list[tuple[str, Any]]) -> None:
        newest = max((r[0] for kind, p in batch if kind == "minutes" for r in p[0]), default=None)
        if newest is None:
            return
        # Retention follows the data's time, but a forward jump of the wall clock (an RTC set to
        # 2030) must not wipe the ledger: the reference advances by the minutes actually recorded
        # since the last batch (or by real time, whichever is more), never by the jump itself.
        # After a restart it starts from the ledger's newest minute plus an hour of slack, so a
        # downtime longer than that delays retention by the downtime (data is kept, not lost).
        mono = time.monotonic()
        minutes = {r[0] for kind, p in batch if kind == "minutes" for r in p[0]}
        if self._ret_ref is None:
            row = self._conn.execute("SELECT max(minute) FROM node_minutes WHERE minute < ?", (newest,)).fetchone()
            self._ret_ref = min(float(newest), float(row[0]) + 3600.0) if row[0] is not None else float(newest)
            self._ret_last = float(newest)
        else:
            if newest < self._ret_last:  # the wall clock was set back (a jump ahead corrected)
                self._ret_last = float(newest)
            recorded = 60.0 * sum(1 for m in minutes if m > self._ret_last)
            self._ret_ref = min(float(newest), self._ret_ref + max(recorded, mono - self._ret_mono))
            self._ret_last = max(self._ret_last, float(newest))
        self._ret_mono = mono
        cutoff = self._ret_ref - self.retention
        with self._conn:
            for table in ("unit_minutes", "server_minutes", "node_minutes"):
                self._conn.execute(f"DELETE FROM {table} WHERE minute < ?", (cutoff,))
            # a series not updated for a day is a deleted pod's: nothing will continue its counter
            self._conn.execute("DELETE FROM counters WHERE last_minute < ?",
                               (max(cutoff, newest - COUNTER_KEEP_S),))
        # the size bound: drop the oldest hours until the data fits beside the WAL's room, then give
        # the freed pages back to the file system and cut the WAL back to nothing
        deleted = False
        for _ in range(1000):
            if self.size() <= self.max_bytes - self.wal_bytes:
                break
            oldest = self._conn.execute("SELECT min(minute) FROM unit_minutes").fetchone()[0]
            if oldest is None:
                break
            with self._conn:
                for table in ("unit_minutes", "server_minutes", "node_minutes"):
                    self._conn.execute(f"DELETE FROM {table} WHERE minute < ?", (oldest + 3600,))
            deleted = True
        if deleted or self._conn.execute("PRAGMA freelist_count").fetchone()[0] > FREE_PAGES_KEPT:
            self._conn.execute("PRAGMA incremental_vacuum")
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")

    def size(self) -> int:
        pages = self._conn.execute("PRAGMA page_count").fetchone()[0]
        free = self._conn.execute("PRAGMA freelist_count").fetchone()[0]
        size = self._conn.execute("PRAGMA page_size").fetchone()[0]
        return int((pages - free) * size)

    def wait_idle(self, timeout: float = 5.0) -> bool:
        """Until everything queued has been written (tests, shutdown)."""
        deadline = time.monotonic() + timeout
        while time.monotonic() < deadline:
            if self._queue.empty() and self._idle.wait(0.05) and self._queue.empty():
                return True
        return False

    def close(self, timeout: float = 1.5) -> None:
        """Stop after what is queued is written. The writer thread closes the connection itself when
        its loop ends: closing it from here while a long write still runs there would crash the
        process (sqlite3 is not safe to close under a running statement); a writer still busy at
        the deadline finishes and closes on its own (a daemon thread: a hard exit just ends it)."""
        self._stop.set()
        self._thread.join(timeout)
        if self._thread.is_alive():
            log.warning("history %s: still writing at shutdown; the writer closes the file when done", self.path)

    def _close_conn(self) -> None:
        try:
            self._conn.close()
        except sqlite3.Error:
            pass


class HistoryRecorder:
    """`on_state` hook of the Agent: the Ledger (aggregation) plus its writer; flushes on close."""

    def __init__(self, path: str, node: str, *, retention: float = 35 * 86400.0, max_bytes: int = 512 * 2**20,
                 block: bool = False):
        self.writer = HistoryWriter(path, retention=retention, max_bytes=max_bytes, block=block)
        self.ledger = Ledger(node, self.writer)
        self.path = path

    def __call__(self, state: AgentState) -> None:
        if state.evaluation_success:
            self.ledger.observe(state)

    @property
    def write_errors(self) -> int:
        return self.writer.write_errors

    def flush(self) -> None:
        self.ledger.flush()

    def close(self) -> None:
        self.ledger.flush()
        self.writer.wait_idle(1.0)
        self.writer.close()


# --------------------------------------------------------------------------------- reading
class History:
    """Read-only view of a ledger file for reports (`gpucap cost`, FOCUS, recommend)."""

    def __init__(self, path: str) -> None:
        if not os.path.exists(path):
            raise FileNotFoundError(path)
        self.path = path
        self.conn = _connect(path, readonly=True)
        self._owner_cache: dict[float, dict[tuple[str, str], tuple[str, str, str, str]]] = {}

    def close(self) -> None:
        self.conn.close()

    def span(self) -> tuple[int, int] | None:
        row = self.conn.execute("SELECT min(minute), max(minute) FROM node_minutes").fetchone()
        return None if row[0] is None else (int(row[0]), int(row[1]) + 60)

    def observed_seconds(self, start: float, end: float) -> dict[str, float]:
        rows = self.conn.execute("SELECT node, sum(seconds) FROM node_minutes WHERE minute >= ? AND minute < ? "
                                 "GROUP BY node", (start, end))
        return {n: float(s) for n, s in rows}

    def node_dollars(self, start: float, end: float) -> float:
        row = self.conn.execute("SELECT sum(dollars) FROM node_minutes WHERE minute >= ? AND minute < ?",
                                (start, end)).fetchone()
        return float(row[0] or 0.0)

    def _owners(self, start: float, end: float) -> dict[tuple[str, str], tuple[str, str, str, str]]:
        """(namespace, pod) → (workload_kind, workload, team, feature) as the ledger knows it, in the window
        or after it (a pod's name carries its ReplicaSet or Job hash: one pod, one owner)."""
        cached = self._owner_cache.get(start)
        if cached is not None:  # a report reads units and servers of one window: one scan, not two
            return cached
        rows = self.conn.execute(
            "SELECT namespace, pod, max(workload_kind), max(workload), max(team), max(feature) FROM unit_minutes "
            "WHERE minute >= ? AND workload != '' GROUP BY namespace, pod", (start,))
        out = {(ns, pod): (kind or "", wl or "", team or "", feat or "") for ns, pod, kind, wl, team, feat in rows}
        self._owner_cache = {start: out}
        return out

    @staticmethod
    def _with_owner(row: dict[str, Any], owners: dict[tuple[str, str], tuple[str, str, str, str]]) -> dict[str, Any]:
        """A pod's minutes from before its owner metadata arrived (the agent's first cycles, an API
        server outage at its start) carry no workload: they get the owner the pod has elsewhere in the
        window, so one workload is not reported twice (once under the pod's name)."""
        if not row.get("workload") and row.get("pod"):
            known = owners.get((row["namespace"], row["pod"]))
            if known is not None:
                for k, v in zip(("workload_kind", "workload", "team", "feature"), known):
                    if not row.get(k):
                        row[k] = v
        return row

    def unit_minutes(self, start: float, end: float) -> Iterator[dict[str, Any]]:
        owners = self._owners(start, end)
        cur = self.conn.execute(f"SELECT {', '.join(UNIT_COLUMNS)} FROM unit_minutes WHERE minute >= ? AND "
                                "minute < ? ORDER BY minute", (start, end))
        for r in cur:
            yield self._with_owner(dict(zip(UNIT_COLUMNS, r)), owners)

    def server_minutes(self, start: float, end: float) -> Iterator[dict[str, Any]]:
        owners = self._owners(start, end)
        cur = self.conn.execute(f"SELECT {', '.join(SERVER_COLUMNS)} FROM server_minutes WHERE minute >= ? AND "
                                "minute < ? ORDER BY minute", (start, end))
        for r in cur:
            yield self._with_owner(dict(zip(SERVER_COLUMNS, r)), owners)

    def hour_rows(self, start: float, end: float) -> Iterator[HourRow]:
        """One row per UTC hour × unit × holder × state with time in that state."""
        hours: dict[tuple, dict[str, Any]] = {}
        for m in self.unit_minutes(start, end):
            hour = int(m["minute"] // 3600 * 3600)
            key = (hour, m["uuid"], m["namespace"], m["pod"], m["container"])
            h = hours.get(key)
            if h is None:
                h = hours[key] = {**m, "hour": hour, "acts": [], "act_sum": 0.0, "act_samples": 0,
                                  **{c: 0.0 for c in _STATE_COLS}}
            for c in _STATE_COLS:
                h[c] += m[c] or 0.0
            if m["act_samples"]:
                h["act_sum"] += m["act_sum"] or 0.0
                h["act_samples"] += m["act_samples"]
                h["acts"].append(m["act_p95"])
            if m["mem_max"] is not None:
                h["mem_max"] = max(h["mem_max"] or 0, m["mem_max"])
            for k in ("hourly_price", "list_hourly_price", "workload", "workload_kind", "team", "feature"):
                if m[k] not in (None, ""):
                    h[k] = m[k]
        for key in sorted(hours):
            h = hours[key]
            acts = sorted(a for a in h["acts"] if a is not None)
            mean = h["act_sum"] / h["act_samples"] if h["act_samples"] else None
            p95 = acts[min(len(acts) - 1, math.ceil(0.95 * len(acts)) - 1)] if acts else None
            for state in STATES:
                secs = h[f"s_{state}"]
                if secs <= 1e-9:
                    continue
                yield HourRow(
                    hour=h["hour"], node=h["node"] or "", gpu=h["gpu"] or "", gpu_instance=h["gpu_instance"] or "",
                    mig_profile=h["mig_profile"] or "", uuid=h["uuid"], model=h["model"] or "", kind=h["kind"] or "",
                    namespace=h["namespace"], pod=h["pod"], container=h["container"],
                    workload_kind=h["workload_kind"] or "", workload=h["workload"] or "", team=h["team"] or "",
                    feature=h["feature"] or "", instance_type=h["instance_type"] or "",
                    capacity_type=h["capacity_type"] or "", price_source=h["price_source"] or "",
                    hourly_price=float(h["hourly_price"] or 0.0), list_hourly_price=float(h["list_hourly_price"] or 0),
                    state=state, seconds=secs, dollars=h[f"d_{state}"], activity_mean=mean, activity_p95=p95,
                    memory_max_bytes=h["mem_max"], gpu_fraction=float(h["gpu_fraction"] or 1.0),
                )


def iter_states(rows: Iterable[HourRow]) -> dict[str, float]:
    out = dict.fromkeys(STATES, 0.0)
    for r in rows:
        out[r.state] += r.dollars
    return out
