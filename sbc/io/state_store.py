"""The state store of ``[state] url``: Redis, over redis-py's asyncio client.

What goes in and comes out is decided by the core (sbc/state.py); this adapter moves it:

- ``persist``: an entry written (SET with PXAT: it expires with what it holds) or deleted.
  Entries are coalesced by key and written in one pipeline per turn of the event loop;
- ``publish``: the core's ``Share`` events (the same the signalling workers exchange), for
  the other SBC instances on the same store and prefix: one PUBLISH per turn on the channel
  ``<prefix>events``, tagged with this instance (its own messages are ignored), and only
  while another instance is subscribed (PUBSUB NUMSUB, and each instance's hello when it
  subscribes); the other instances' arrive at ``on_events``;
- ``secret``: the key of the flow tokens and dialog tokens, made once and kept in the store
  (``<prefix>secret``), so that a Path a backend holds and a tag a phone holds stay good
  across a restart and between instances;
- ``load``: every entry at start (the only scan: SCAN by prefix, then MGET);
- heartbeats: every ``HEARTBEAT`` seconds (and once its listeners are bound) each instance
  says on the channel that it lives and where its access listeners are (``peer_at``: a
  request for a client whose flow is a live instance's goes through that instance).

The store being down loses nothing the SBC serves: it keeps working from memory, counts the
failure, says so in ``health`` (/readyz says degraded, /metrics has ``sbc_state_up``),
keeps the latest value of every entry it could not write, retries every second, and when
the store answers again writes those and then everything (``on_recovered``: the store may
have restarted empty).
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import time
from collections.abc import Callable
from typing import Any

import redis.asyncio as redis
from redis.exceptions import RedisError

from sbc.actions import Persist
from sbc.state import KINDS, StateHealth

log = logging.getLogger("sbc.state")

TIMEOUT = 2.0  # seconds for a connection or a command before the store counts as down
RETRY = 1.0  # seconds between two tries while it is down
SCAN_COUNT = 1000
MGET_BATCH = 500
MAX_OUTBOX = 10_000  # events for the other instances kept while the store is down
NUMSUB_EVERY = 5.0  # seconds between two counts of the channel's other subscribers
# The writer gathers changes this long after the first one before it sends them: at a few
# hundred calls per second a pipeline then carries several entries instead of one (redis-py
# costs ~80 us of CPU per pipeline); an entry reaches the store that much later.
GATHER = 0.005
# Every instance says it lives (and where its access listeners are) this often on the
# channel; one not heard of for three times as long is taken for dead.
HEARTBEAT = 1.0

Event = tuple[object, ...]


class StateStore:
    def __init__(
        self,
        url: str,
        prefix: str,
        *,
        instance: str,
        on_events: Callable[[list[Event]], None],
        on_recovered: Callable[[], None],
        health: StateHealth | None = None,
    ) -> None:
        self.prefix = prefix
        self.instance = instance
        self.channel = f"{prefix}events"
        self.on_events = on_events
        self.on_recovered = on_recovered
        self.health = health or StateHealth()
        self._redis: Any = redis.Redis.from_url(
            url, socket_timeout=TIMEOUT, socket_connect_timeout=TIMEOUT
        )
        self._secret: bytes | None = None  # this instance's (written back after a loss)
        self._pending: dict[str, Persist] = {}
        self._outbox: list[Event] = []
        self._wake = asyncio.Event()
        self._tasks: list[asyncio.Task[None]] = []
        self._closing = False  # close() began: the writer and the subscriber stop
        # Other instances on the channel (PUBSUB NUMSUB less this one's subscription, asked
        # with the writes every NUMSUB_EVERY s; an instance's hello counts at once): events
        # are published only while there are some.
        self._others = 1
        self._numsub_at = 0.0
        self._subscribed = False
        # This instance's access listeners, (transport, host, port), said in its heartbeats;
        # the other instances': instance -> (when last heard, its listeners).
        self.listens: list[tuple[str, str, int]] = []
        self._peers: dict[str, tuple[float, list[tuple[str, str, int]]]] = {}

    # -- start -----------------------------------------------------------------------------
    async def open(self) -> bool:
        """Whether the store answers now (if not, the SBC starts degraded and the writer
        keeps trying)."""
        try:
            await self._redis.ping()
        except (RedisError, OSError) as exc:
            self._down(exc)
            return False
        self.health.up = True
        return True

    def keep_secret(self, secret: bytes) -> None:
        """The secret this instance uses: written (if the store has none) whenever the
        store answers again (a store down at start, or restarted empty)."""
        self._secret = secret

    async def secret(self, fresh: bytes) -> bytes:
        """The store's secret; ``fresh`` becomes it if there is none yet."""
        key = f"{self.prefix}secret"
        self._secret = fresh
        await self._redis.set(key, fresh.hex(), nx=True)
        value = await self._redis.get(key)
        try:
            stored = bytes.fromhex(value.decode())
        except (AttributeError, ValueError):
            stored = b""
        if len(stored) != len(fresh):
            log.error("%s holds no usable secret; this instance uses its own", key)
            return fresh
        self._secret = stored
        return stored

    async def load(self) -> list[tuple[str, bytes]]:
        """Every entry under the prefix: (key without the prefix, value)."""
        rows: list[tuple[str, bytes]] = []
        for kind in KINDS:
            keys = [k async for k in self._redis.scan_iter(f"{self.prefix}{kind}*", SCAN_COUNT)]
            for i in range(0, len(keys), MGET_BATCH):
                batch = keys[i : i + MGET_BATCH]
                for key, value in zip(batch, await self._redis.mget(batch), strict=True):
                    if value is not None:
                        rows.append((key.decode()[len(self.prefix) :], value))
        self.health.loaded = len(rows)
        return rows

    def start(self) -> None:
        """Run the writer and the subscriber."""
        self._tasks = [
            asyncio.create_task(self._writer(), name="state-writer"),
            asyncio.create_task(self._subscriber(), name="state-subscriber"),
            asyncio.create_task(self._heartbeat(), name="state-heartbeat"),
        ]
        if not self.health.up:
            self._wake.set()  # down at start: the writer tries until it answers

    # -- changes -----------------------------------------------------------------------------
    def persist(self, entry: Persist) -> None:
        pending = self._pending.get(entry.key)
        if entry.value is None and pending is not None and pending.fresh:
            del self._pending[entry.key]  # written never, deleted now: nothing to send
        elif pending is not None and pending.fresh:
            self._pending[entry.key] = Persist(entry.key, entry.value, entry.expires_at, True)
        else:
            self._pending[entry.key] = entry
        self.health.pending = len(self._pending)
        self._wake.set()

    @property
    def shares(self) -> bool:
        """Whether another instance listens (events for it are worth making)."""
        return self._others > 0

    def publish(self, event: Event) -> None:
        """An event (times already in wall-clock seconds) for the other instances."""
        if self._others <= 0:
            return  # nobody else on the channel; a newcomer loads the entries
        if len(self._outbox) >= MAX_OUTBOX:
            del self._outbox[0]  # the store is down: the oldest goes (a resync follows)
            self.health.dropped += 1
        self._outbox.append(event)
        self._wake.set()

    async def _writer(self) -> None:
        # A cancellation that lands inside redis-py's Pipeline.execute may be swallowed
        # there: the loop also ends on ``_closing``.
        while not self._closing:
            await self._wake.wait()
            self._wake.clear()
            if self._closing:
                return
            if not self.health.up:
                await self._recover()
                continue
            await asyncio.sleep(GATHER)
            batch, self._pending = self._pending, {}
            events, self._outbox = self._outbox, []
            try:
                await self._write(batch, events)
            except (RedisError, OSError) as exc:
                for key, entry in batch.items():
                    self._pending.setdefault(key, entry)  # a newer value stays
                self._outbox[:0] = events[-MAX_OUTBOX:]
                self._down(exc)
                self._wake.set()
            self.health.pending = len(self._pending)

    async def _write(self, batch: dict[str, Persist], events: list[Event]) -> None:
        if not batch and not events:
            return
        now_ms = int(time.time() * 1000)
        pipe = self._redis.pipeline(transaction=False)
        count = time.monotonic() >= self._numsub_at
        for key, entry in batch.items():
            at_ms = int(entry.expires_at * 1000)
            if entry.value is None or at_ms <= now_ms:
                pipe.delete(self.prefix + key)
            else:
                pipe.set(self.prefix + key, entry.value, pxat=at_ms)
        if events and self._others > 0:
            message = {"from": self.instance, "events": events}
            pipe.publish(self.channel, json.dumps(message, separators=(",", ":")))
        if count:
            pipe.pubsub_numsub(self.channel)
        results = await pipe.execute()
        if count:
            self._numsub_at = time.monotonic() + NUMSUB_EVERY
            subscribers = sum(int(n) for _, n in results[-1])
            self._others = max(0, subscribers - (1 if self._subscribed else 0))
        self.health.writes += len(batch)
        self.health.published += len(events)

    async def _recover(self) -> None:
        """Down: try again every RETRY seconds; once it answers, write back everything."""
        while not self._closing:
            try:
                await self._redis.ping()
                if self._secret is not None:  # a store that restarted empty gets it back
                    await self._redis.set(f"{self.prefix}secret", self._secret.hex(), nx=True)
                break
            except (RedisError, OSError):
                await asyncio.sleep(RETRY)
        log.warning("state store reachable again; writing the state back")
        self.health.up = True
        self.health.down_since = None
        self.on_recovered()
        self._wake.set()

    def _down(self, exc: BaseException) -> None:
        self.health.errors += 1
        if self.health.up or self.health.down_since is None:
            log.error("state store unreachable, serving from memory: %s", exc)
            self.health.down_since = time.time()
        self.health.up = False

    # -- the other instances ------------------------------------------------------------------
    async def _subscriber(self) -> None:
        while not self._closing:
            pubsub = self._redis.pubsub(ignore_subscribe_messages=True)
            try:
                await pubsub.subscribe(self.channel)
                self._subscribed = True
                # Hello: the others publish from now on (they may have stopped, alone).
                await self._hello()
                async for message in pubsub.listen():
                    self._received(message.get("data"))
            except (RedisError, OSError):
                pass  # the writer counts and logs the store's being down
            finally:
                self._subscribed = False
                with contextlib.suppress(RedisError, OSError):
                    await pubsub.aclose()
            await asyncio.sleep(RETRY)

    async def _hello(self) -> None:
        hello = {"from": self.instance, "events": [], "listens": self.listens}
        await self._redis.publish(self.channel, json.dumps(hello))

    def announce(self, listens: list[tuple[str, str, int]]) -> None:
        """This instance's access listeners, said to the others at once (and then in every
        heartbeat)."""
        self.listens = listens
        if self._subscribed:
            task = asyncio.create_task(self._hello(), name="state-hello")
            task.add_done_callback(lambda t: t.cancelled() or t.exception())

    async def _heartbeat(self) -> None:
        while not self._closing:
            await asyncio.sleep(HEARTBEAT)
            if self._subscribed:
                with contextlib.suppress(RedisError, OSError):
                    await asyncio.wait_for(self._hello(), TIMEOUT)

    def peer_at(self, address: tuple[str, int]) -> tuple[str, int] | None:
        """The UDP access address of a live instance that listens at ``address`` (one of
        its access listeners, any transport), of the same address family; None if none."""
        now = time.monotonic()
        for seen, listens in self._peers.values():
            if now - seen > 3 * HEARTBEAT:
                continue
            if any((host, port) == address for _, host, port in listens):
                v6 = ":" in address[0]
                for transport, host, port in listens:
                    if transport == "udp" and (":" in host) == v6:
                        return host, port
        return None

    def _received(self, data: object) -> None:
        try:
            message = json.loads(data)  # type: ignore[arg-type]
            if message.get("from") == self.instance:
                return
            events = [tuple(e) for e in message["events"]]
        except (TypeError, ValueError, KeyError, AttributeError):
            self.health.malformed += 1
            return
        self._others = max(self._others, 1)  # another instance is there
        listens = message.get("listens")
        if isinstance(listens, list):
            try:
                self._peers[str(message["from"])] = (
                    time.monotonic(),
                    [(str(t), str(h), int(p)) for t, h, p in listens],
                )
            except (TypeError, ValueError):
                self.health.malformed += 1
        if not events:
            return  # a hello or a heartbeat
        self.health.received += len(events)
        self.on_events(events)

    async def close(self) -> None:
        """Write what is pending (briefly), then stop (bounded: a stop never hangs on the
        store)."""
        self._closing = True
        self._wake.set()
        if self.health.up and (self._pending or self._outbox):
            batch, self._pending = self._pending, {}
            events, self._outbox = self._outbox, []
            with contextlib.suppress(RedisError, OSError, TimeoutError):
                await asyncio.wait_for(self._write(batch, events), TIMEOUT)
        for task in self._tasks:
            task.cancel()
        if self._tasks:
            await asyncio.wait(self._tasks, timeout=TIMEOUT)
        with contextlib.suppress(RedisError, OSError, TimeoutError):
            await asyncio.wait_for(self._redis.aclose(), TIMEOUT)
