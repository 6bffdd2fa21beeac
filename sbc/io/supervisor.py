"""The supervisor of the signalling workers: ``sbc run`` with ``[sbc] workers = N > 1``.

The main process does no SIP. It starts N worker processes (``sbc worker``), each the whole
SBC of ``sbc.app.serve`` with a ``WorkerRole``: the access listeners bound by all of them
with SO_REUSEPORT, a core address of its own (the core port plus its index), its share of
the media ports and its own media workers. It then:

- restarts a worker that dies, at once (after ``CRASH_PAUSE`` if it died within
  ``CRASH_WINDOW`` of its start, so that a worker that cannot start does not spin), logs
  it and counts it (``sbc_worker_restarts_total``);
- passes SIGHUP (reload), SIGTERM (drain, then stop) and SIGINT on to every worker, and
  exits once they all have;
- serves ``[admin] listen``: /metrics, /status and /readyz ask every worker over its Unix
  socket and merge the answers (``sbc.workers_report``), so that operations see one SBC.

The workers share one secret, made here (the key of the flow tokens in Path: one worker's
token is good in another and after a restart), and get it in their environment.
docs/architecture.md ("Signalling workers") says how work is spread and what is shared.
"""

from __future__ import annotations

import asyncio
import contextlib
import json
import logging
import os
import secrets
import shutil
import signal
import sys
import tempfile
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from prometheus_client.exposition import choose_encoder

from sbc import audit
from sbc.config import Config
from sbc.core import SECRET_BYTES
from sbc.io.admin import AdminHttp
from sbc.workers_report import WorkerState, merge_status, merged_registry

__all__ = ["SECRET_ENV", "set_parent_death_signal", "supervise"]

log = logging.getLogger("sbc.supervisor")

SECRET_ENV = "SBC_WORKER_SECRET"  # hex; the environment of a process is its owner's only
CRASH_WINDOW = 1.0  # s: a worker that dies this soon after its start is crashing
CRASH_PAUSE = 0.5  # s before starting such a worker again
FETCH_TIMEOUT = 1.0  # s for a worker to answer the supervisor's admin request
STOP_GRACE = 5.0  # s after the last SIGTERM before a worker still there is killed


@dataclass(slots=True)
class _Worker:
    index: int
    socket: str  # its admin endpoint
    proc: asyncio.subprocess.Process | None = None
    started_at: float | None = None  # wall clock
    started_mono: float = 0.0
    restarts: int = 0
    serving: bool = False  # it said "ready" (all its listeners are bound)
    served: bool = False  # it did once: an exit before that is a failure to start

    def state(self) -> WorkerState:
        running = self.proc is not None and self.proc.returncode is None
        return WorkerState(
            index=self.index,
            pid=self.proc.pid if self.proc is not None else None,
            running=running,
            restarts=self.restarts,
            started_at=self.started_at,
        )


class Supervisor:
    def __init__(self, config: Config, path: str | Path, runtime: str) -> None:
        self.config = config
        self.path = str(Path(path).absolute())
        self.runtime = runtime
        self.secret = secrets.token_bytes(SECRET_BYTES)
        self.workers = [
            _Worker(i, os.path.join(runtime, f"worker-{i}.admin"))
            for i in range(config.sbc.workers)
        ]
        self.stopping = False
        self.failed = False  # a worker did not start
        self.stop = asyncio.Event()
        self.all_serving = asyncio.Event()
        self._watchers: list[asyncio.Task[None]] = []

    # -- processes ---------------------------------------------------------------------------
    async def _start(self, worker: _Worker) -> None:
        read_end, write_end = os.pipe()
        env = dict(os.environ, **{SECRET_ENV: self.secret.hex()})
        try:
            worker.proc = await asyncio.create_subprocess_exec(
                sys.executable, "-m", "sbc", "worker", "--config", self.path,
                "--index", str(worker.index), "--workers", str(len(self.workers)),
                "--runtime", self.runtime, "--ready-fd", str(write_end),
                *(("--restarted",) if worker.served else ()),
                "--parent", str(os.getpid()),
                stdin=asyncio.subprocess.DEVNULL, pass_fds=(write_end,), env=env,
            )  # fmt: skip
        finally:
            os.close(write_end)
        worker.started_at = time.time()
        worker.started_mono = time.monotonic()
        worker.serving = False
        log.info("worker %d started", worker.index, extra={"pid": worker.proc.pid})
        task = asyncio.create_task(self._read_ready(worker, read_end))
        self._watchers.append(task)

    async def _read_ready(self, worker: _Worker, fd: int) -> None:
        loop = asyncio.get_running_loop()
        reader = asyncio.StreamReader()
        pipe = os.fdopen(fd, "rb", buffering=0)
        transport, _ = await loop.connect_read_pipe(
            lambda: asyncio.StreamReaderProtocol(reader), pipe
        )
        try:
            line = await reader.readline()
            if line.strip() == b"ready":
                worker.serving = worker.served = True
                if all(w.serving for w in self.workers):
                    self.all_serving.set()
        finally:
            transport.close()

    async def _watch(self, worker: _Worker) -> None:
        """Wait for the worker to exit; start it again unless the SBC is stopping."""
        while True:
            assert worker.proc is not None
            code = await worker.proc.wait()
            worker.serving = False
            if self.stopping:
                return
            how = f"signal {-code}" if code < 0 else f"exit code {code}"
            if not worker.served and not self.all_serving.is_set():
                # It never started (a port in use, a certificate missing): so would the
                # next one. The SBC does not start.
                log.error("worker %d did not start (%s); stopping", worker.index, how)
                self.failed = True
                self.stop.set()
                return
            log.error(
                "worker %d (pid %d) ended (%s); restarting it", worker.index, worker.proc.pid, how
            )
            worker.restarts += 1
            if time.monotonic() - worker.started_mono < CRASH_WINDOW:
                await asyncio.sleep(CRASH_PAUSE)
                if self.stopping:
                    return
            await self._start(worker)
            if self.stopping:  # the SBC began to stop while this one was starting
                assert worker.proc is not None
                with contextlib.suppress(ProcessLookupError):
                    worker.proc.send_signal(signal.SIGTERM)
                return

    def signal_all(self, sig: int) -> None:
        for worker in self.workers:
            proc = worker.proc
            if proc is not None and proc.returncode is None:
                with contextlib.suppress(ProcessLookupError):
                    proc.send_signal(sig)

    async def _wait_all(self, timeout: float) -> None:
        procs = [w.proc for w in self.workers if w.proc is not None]
        with contextlib.suppress(TimeoutError):
            await asyncio.wait_for(asyncio.gather(*(p.wait() for p in procs)), timeout)
        for proc in procs:
            if proc.returncode is None:
                log.error("worker pid %d did not stop; killed", proc.pid)
                with contextlib.suppress(ProcessLookupError):
                    proc.kill()
                await proc.wait()

    # -- the admin endpoint ------------------------------------------------------------------
    async def fetch(self, worker: _Worker, target: str) -> tuple[int, bytes] | None:
        """GET ``target`` from a worker's admin socket: (status, body), or None."""
        if worker.proc is None or worker.proc.returncode is not None:
            return None
        try:
            reader, writer = await asyncio.wait_for(
                asyncio.open_unix_connection(worker.socket), FETCH_TIMEOUT
            )
        except (OSError, TimeoutError):
            return None
        try:
            writer.write(
                f"GET {target} HTTP/1.1\r\nHost: worker\r\nAccept: text/plain\r\n"
                "Connection: close\r\n\r\n".encode()
            )
            data = await asyncio.wait_for(reader.read(), FETCH_TIMEOUT)  # to the end
        except (OSError, TimeoutError):
            return None
        finally:
            writer.close()
        head, _, body = data.partition(b"\r\n\r\n")
        parts = head.split(b" ", 2)
        if len(parts) < 2 or not parts[1].isdigit():
            return None
        return int(parts[1]), body

    async def fetch_all(self, target: str) -> list[tuple[int, bytes | None]]:
        answers = await asyncio.gather(*(self.fetch(w, target) for w in self.workers))
        return [
            (w.index, a[1] if a is not None and a[0] in (200, 503) else None)
            for w, a in zip(self.workers, answers, strict=True)
        ]

    async def run(self, hup: asyncio.Event, term: list[int]) -> None:
        stop = self.stop
        admin = await WorkersAdmin.start(self)
        try:
            for worker in self.workers:
                await self._start(worker)
            self._watchers += [asyncio.create_task(self._watch(w)) for w in self.workers]
            ready = asyncio.create_task(self.all_serving.wait())
            stopped = asyncio.create_task(stop.wait())
            await asyncio.wait((ready, stopped), return_when=asyncio.FIRST_COMPLETED)
            ready.cancel()
            stopped.cancel()
            if self.all_serving.is_set() and not stop.is_set():
                admin.listening = True
                log.info(
                    "ready",
                    extra={"sbc": self.config.sbc.name, "workers": len(self.workers)},
                )
            while not stop.is_set():
                hup_wait = asyncio.create_task(hup.wait())
                stop_wait = asyncio.create_task(stop.wait())
                await asyncio.wait((hup_wait, stop_wait), return_when=asyncio.FIRST_COMPLETED)
                hup_wait.cancel()
                stop_wait.cancel()
                if hup.is_set():
                    hup.clear()
                    log.info("passing SIGHUP (reload) to the workers")
                    self.signal_all(signal.SIGHUP)
        finally:
            self.stopping = True
            admin.listening = False
            # The workers drain (their own drain timeout); a second SIGTERM cuts it short.
            deadline = self.config.calls.drain_timeout + STOP_GRACE
            self.signal_all(signal.SIGTERM if term[0] < 2 else signal.SIGINT)
            await self._wait_all(deadline)
            for task in self._watchers:
                task.cancel()
            await admin.close()
            log.info("sbc stopped")


class WorkersAdmin(AdminHttp):
    """``[admin] listen`` of a supervised SBC: every answer is the workers' merged."""

    def __init__(self, supervisor: Supervisor) -> None:
        super().__init__()
        self.supervisor = supervisor
        self.audit = lambda: audit.report(supervisor.config, str(supervisor.path))

    @classmethod
    async def start(cls, supervisor: Supervisor) -> WorkersAdmin:
        self = cls(supervisor)
        listen = supervisor.config.admin.listen
        await self._bind(listen.host, listen.port, None)
        return self

    async def readyz(self) -> tuple[bool, str]:
        if not self.listening:
            return False, "workers starting" if not self.supervisor.stopping else "stopping"
        report = await self.status()
        return bool(report["ready"]), str(report["reason"])

    async def status(self) -> dict[str, Any]:
        sup = self.supervisor
        answers = await sup.fetch_all("/status")
        reports: list[tuple[int, dict[str, Any] | None]] = []
        for index, body in answers:
            try:
                reports.append((index, json.loads(body) if body is not None else None))
            except ValueError:
                reports.append((index, None))
        return merge_status(
            reports,
            [w.state() for w in sup.workers],
            name=sup.config.sbc.name,
            pid=os.getpid(),
            reload=merged_reload([r for _, r in reports if r is not None]),
            now=time.time(),
        )

    async def metrics(self, accept: str) -> tuple[bytes, str]:
        sup = self.supervisor
        texts = [
            (index, body.decode("utf-8", "replace") if body is not None else None)
            for index, body in await sup.fetch_all("/metrics")
        ]
        encoder, content_type = choose_encoder(accept)
        return encoder(merged_registry(texts, [w.state() for w in sup.workers])), content_type


def merged_reload(reports: list[dict[str, Any]]) -> dict[str, object] | None:
    """The workers' last reloads as one: done when every worker did it (the smallest
    generation), refused if one refused (its reason). ``sbc reload`` reads it."""
    states = [r["reload"] for r in reports if isinstance(r.get("reload"), dict)]
    if not states:
        return None
    errors = [s.get("error") for s in states if not s.get("ok")]
    stamps = [s["at"] for s in states if s.get("at") is not None]
    return {
        "path": states[0].get("path"),
        "generation": min(int(s.get("generation", 0)) for s in states),
        "ok": not errors,
        "error": errors[0] if errors else None,
        "at": max(stamps) if stamps else None,
        "applied": min(int(s.get("applied", 0)) for s in states),
    }


def supervise(config: Config, path: str | Path) -> int:
    """Run the workers until SIGTERM/SIGINT; the exit code of ``sbc run``."""
    runtime = tempfile.mkdtemp(prefix="sbc-")  # the workers' admin sockets; 0700

    failed = False

    async def main() -> None:
        nonlocal failed
        hup = asyncio.Event()
        term = [0]
        loop = asyncio.get_running_loop()
        supervisor = Supervisor(config, path, runtime)
        stop = supervisor.stop

        def on_term() -> None:
            term[0] += 1
            if stop.is_set():  # a second SIGTERM: the workers stop at once
                supervisor.signal_all(signal.SIGTERM)
            stop.set()

        def on_int() -> None:
            term[0] += 2
            if stop.is_set():
                supervisor.signal_all(signal.SIGINT)
            stop.set()

        loop.add_signal_handler(signal.SIGTERM, on_term)
        loop.add_signal_handler(signal.SIGINT, on_int)
        loop.add_signal_handler(signal.SIGHUP, hup.set)
        await supervisor.run(hup, term)
        failed = supervisor.failed

    try:
        asyncio.run(main())
    finally:
        shutil.rmtree(runtime, ignore_errors=True)
    return 1 if failed else 0


def set_parent_death_signal(parent: int) -> None:
    """A worker ends (SIGTERM: it drains) when the supervisor does, even by SIGKILL
    (Linux prctl PR_SET_PDEATHSIG); and at once if the supervisor is already gone."""
    import ctypes

    with contextlib.suppress(OSError, AttributeError):
        libc = ctypes.CDLL(None, use_errno=True)
        libc.prctl(1, signal.SIGTERM, 0, 0, 0)  # 1: PR_SET_PDEATHSIG
    if os.getppid() != parent:
        raise SystemExit(0)
