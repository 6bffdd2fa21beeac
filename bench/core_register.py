"""CPU per REGISTER of the sans-I/O core alone: no sockets, no event loop.

    .venv/bin/python bench/core_register.py [--users 2000] [--rounds 3] [--default-gc] [--profile]

Drives ``SbcCore`` with the registration tests' helpers (tests/test_registration.py: one
backend, clients over one UDP flow) and times only the core's own entry points
(``receive_datagram``, ``handle_timer``), so the figures are what the signalling process
spends before any I/O:

- per initial REGISTER: the client's REGISTER forwarded to the backend (Path with the flow
  token, the backend's long expiry), the backend's 401 passed back, the REGISTER again with
  credentials forwarded, the backend's 200 passed back to the client (the short expiry, the
  registration cached for offload), and the timers that end those transactions;
- per offloaded refresh: a re-REGISTER answered by the SBC from its template
  (sbc/registration/refresh.py), unparsed; and, beside it, the first offloaded refresh of
  each registration, which takes the full path (parsed, a server transaction) and makes the
  template.

The time is the CPU time of this thread (CLOCK_THREAD_CPUTIME_ID) spent inside those entry
points, with the garbage collector set as the running SBC sets it (``sbc.app.tune_gc``;
``--default-gc`` leaves Python's defaults); each figure is the median of ``--rounds`` rounds.
``--profile`` prints cProfile's top functions (by own time) of one more run.

``--count N --phase initial|refresh`` runs once, untimed, for instruction counts (``valgrind
--tool=callgrind``; per operation: the difference between N=400 and N=100, over 300): beside
500 registered users with templates, N initial REGISTERs, or N refreshes answered from
templates (100 users, N/100 each).
"""

from __future__ import annotations

import argparse
import cProfile
import pstats
import statistics
import sys
from pathlib import Path
from typing import Any

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "tests"))

import test_registration as tr
from sipdata import sip
from timed import TimedCore

from sbc.actions import SendData
from sbc.app import tune_gc
from sbc.sip.flow import Flow
from sbc.sip.message import Request, make_response
from sbc.sip.parser import parse_message

PHASES = ("initial", "full_refresh", "refresh", "other")
spent = dict.fromkeys(PHASES, 0.0)
phase = ["other"]
timing = [False]  # main() times the entry points; the profile and --round runs do not
ENTRY_POINTS = ("receive_datagram", "handle_timer")
BACKEND = Flow("udp", tr.CORE, tr.B1)
# The tests' REGISTER with a branch of each user's own (a new transaction per request).
REGISTER = tr.REGISTER.replace("z9hG4bK-reg{n}", "z9hG4bK-{user}-{n}")
STEP = 0.0005  # seconds between users: all of them register within the client expiry

AUTH = (
    'Authorization: Digest username="{user}", realm="example.com", nonce="{nonce}", '
    'uri="sip:example.com", response="{n:032x}", algorithm=MD5\n'
)
CHALLENGE = 'Digest realm="example.com", nonce="{nonce}", algorithm=MD5'


def _spend(seconds: float) -> None:
    spent[phase[0]] += seconds


class Bench:
    def __init__(self) -> None:
        core = tr.make_core(tr.B1)
        self.core: Any = TimedCore(core, ENTRY_POINTS, _spend) if timing[0] else core
        self.now = 0.0
        self.run_until(0.0)

    def run_until(self, until: float) -> None:
        """The core's timers up to ``until``; the backend answers its probes."""
        while (deadline := self.core.next_deadline()) is not None and deadline <= until:
            self.now = max(self.now, deadline)
            self._backend(self.core.handle_timer(self.now))
        self.now = max(self.now, until)

    def _backend(self, actions: list[object]) -> list[Request]:
        """What the core sent: OPTIONS probes answered 200 at once, REGISTERs returned."""
        registers = []
        for action in actions:
            assert isinstance(action, SendData)
            if action.flow.remote != tr.B1:
                continue
            msg = parse_message(action.data)
            assert isinstance(msg, Request)
            if msg.method == "OPTIONS":
                resp = make_response(msg, 200, to_tag="probe")
                saved, phase[0] = phase[0], "other"
                self.core.receive_datagram(bytes(resp), BACKEND, self.now)
                phase[0] = saved
            else:
                registers.append(msg)
        return registers

    def _to_backend(self, data: bytes) -> Request:
        [fwd] = self._backend(self.core.receive_datagram(data, tr.CLIENT, self.now))
        return fwd

    def _to_client(self, data: bytes) -> None:
        [action] = self.core.receive_datagram(data, BACKEND, self.now)
        assert isinstance(action, SendData) and action.flow == tr.CLIENT

    def register(self, i: int, kind: str) -> None:
        """User ``i`` registers: challenged once, then accepted (RFC 3261 10.2, 22.4)."""
        user, nonce = f"u{i}", f"n{i:08x}"
        phase[0] = kind
        fwd = self._to_backend(sip(REGISTER.format(n=1, user=user)))
        challenge = make_response(fwd, 401, to_tag=f"c{i}")
        challenge.add("WWW-Authenticate", CHALLENGE.format(nonce=nonce))
        challenge.add("Server", "kamailio (5.6.3 (x86_64/linux))")
        self._to_client(bytes(challenge))
        fwd = self._to_backend(self.with_auth(user, nonce, 2))
        assert fwd.get("authorization") is not None
        ok = make_response(fwd, 200, to_tag=f"r{i}")
        asked = fwd.contact[0].param("expires")
        ok.add("Contact", f"<sip:{user}@10.0.0.7:5060>;expires={asked}")
        ok.add("Path", fwd.get("path") or "")
        ok.add("Server", "kamailio (5.6.3 (x86_64/linux))")
        self._to_client(bytes(ok))
        phase[0] = "other"

    def populate(self, users: range, refreshes: int, *, timed: bool) -> None:
        """``users`` register, then refresh once through the full path and ``refreshes``
        times from their templates; phases "other" unless ``timed``."""
        for i in users:
            self.register(i, "initial" if timed else "other")
            self.now += STEP
            if i % 100 == 0:
                self.run_until(self.now)
        self.run_until(self.now + 1)
        for i in users:
            self.refresh(i, 3, "full_refresh" if timed else "other")
        for n in range(4, 4 + refreshes):
            for i in users:
                self.refresh(i, n, "refresh" if timed else "other")
            self.run_until(self.now + 1)

    @staticmethod
    def with_auth(user: str, nonce: str, n: int) -> bytes:
        auth = AUTH.format(user=user, nonce=nonce, n=n)
        return sip(REGISTER.format(n=n, user=user).replace("Expires:", auth + "Expires:"))

    def refresh(self, i: int, n: int, kind: str) -> None:
        """User ``i``'s re-REGISTER with CSeq ``n``, answered by the SBC itself."""
        phase[0] = kind
        [action] = self.core.receive_datagram(self.with_auth(f"u{i}", f"n{i:08x}", n),
                                              tr.CLIENT, self.now)  # fmt: skip
        phase[0] = "other"
        assert isinstance(action, SendData) and action.flow == tr.CLIENT
        assert action.data.startswith(b"SIP/2.0 200 ")


def run(users: int, refreshes: int) -> None:
    """``users`` initial REGISTERs, then each one's first offloaded refresh (full path, the
    template made), then ``refreshes`` more each, answered from the templates; all of it
    beside as many users registered before, untimed, each with its template (as in a running
    SBC, where most datagrams arrive while many registrations are cached)."""
    bench = Bench()
    bench.populate(range(users, 2 * users), refreshes, timed=False)
    bench.populate(range(users), refreshes, timed=True)
    stats = bench.core.registration.stats
    assert stats["register_forwarded"] == 4 * users, stats
    assert stats["register_templated"] == 2 * refreshes * users, stats
    bench.run_until(bench.now + 40)  # every transaction over (64*T1), no client expired yet


def count_run(n: int, what: str) -> None:
    """``n`` initial REGISTERs or templated refreshes beside 500 registered users."""
    bench = Bench()
    bench.populate(range(10_000, 10_500), 1, timed=False)
    if what == "initial":
        for i in range(n):
            bench.register(i, "other")
            bench.now += STEP
            if i % 100 == 0:
                bench.run_until(bench.now)
    else:
        bench.populate(range(100), n // 100, timed=False)
    bench.run_until(bench.now + 40)


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n", 1)[0])
    ap.add_argument("--users", type=int, default=2000, help="users registered (2000)")
    ap.add_argument("--refreshes", type=int, default=4, help="templated refreshes per user (4)")
    ap.add_argument("--rounds", type=int, default=3, help="rounds; the median is reported (3)")
    ap.add_argument("--profile", action="store_true", help="print cProfile's top functions")
    ap.add_argument("--default-gc", action="store_true", help="Python's GC defaults, not the SBC's")
    ap.add_argument("--sort", default="tottime", help="the profile's order (tottime)")
    ap.add_argument("--count", type=int, metavar="N", help="one untimed run of N operations")
    ap.add_argument("--phase", choices=("initial", "refresh"), default="initial")
    args = ap.parse_args()
    if args.count is not None:
        if not args.default_gc:
            tune_gc()
        count_run(args.count, args.phase)
        return
    timing[0] = True
    run(200, args.refreshes)  # warm-up: imports, caches
    if not args.default_gc:
        tune_gc()
    figures: dict[str, list[float]] = {name: [] for name in PHASES}
    counts = {"initial": args.users, "full_refresh": args.users}
    counts["refresh"] = args.users * args.refreshes
    for _ in range(args.rounds):
        for name in PHASES:
            spent[name] = 0.0
        run(args.users, args.refreshes)
        for name, count in counts.items():
            figures[name].append(spent[name] / max(count, 1))
    gc_mode = "default GC" if args.default_gc else "the SBC's GC settings"
    print(f"core CPU, median of {args.rounds} rounds of {args.users} users with {gc_mode}:")
    labels = {
        "initial": "initial REGISTER (401 round + 200)",
        "full_refresh": "offloaded refresh, full path",
        "refresh": "offloaded refresh, template",
    }
    for name, label in labels.items():
        each = ", ".join(f"{x * 1e6:.1f}" for x in figures[name])
        print(f"  {label:36} {statistics.median(figures[name]) * 1e6:7.1f} us  ({each})")
    if args.profile:
        timing[0] = False
        profile = cProfile.Profile()
        profile.enable()
        run(args.users, args.refreshes)
        profile.disable()
        pstats.Stats(profile).sort_stats(args.sort).print_stats("sbc/", 60)


if __name__ == "__main__":
    main()
