"""A real headless Chromium as a WebRTC client of the SBC, driven over the DevTools protocol.

Chromium gathers ICE candidates on every interface it sees and may nominate a pair that
leaves the machine, so a WebRTC test runs inside ``netns.isolated()``: a fresh network
namespace with only ``lo`` up, entered by the test's own thread, so that the SBC, baresip
and the browser it starts from then on see loopback only (the ``webrtc_netns`` fixture).

- ``Chromium.start(workdir, tone=WAV)``: Debian's ``chromium``, headless, as root (no
  sandbox), with a fake microphone playing ``tone`` (a 48 kHz WAV: ``browser_tone()``), kept
  on loopback (a dead proxy, every host name unresolvable but 127.0.0.1, no background
  networking, no mDNS-hidden candidates) and a DevTools port of its own choosing (read from
  its profile's DevToolsActivePort). It runs in a process group of its own; ``stop()`` ends
  that group (and nothing else) and removes the profile; ``kill()`` crashes it (SIGKILL).
- The page: one tab, attached over the browser's DevTools websocket (the ``websockets``
  package's sync client): ``open(url)``, ``evaluate(expr)`` (Runtime.evaluate, promises
  awaited, the value returned by value), ``wait_for(expr, timeout)``, ``screenshot(path)``;
  console messages, uncaught exceptions and log entries are kept in ``console`` and
  ``explain()`` prints them (and the page's ``phone.log``) for a failure message.
- ``chromium_binary()``: the binary, or skip (fail under CI=true) as ``conftest.require``.
"""

from __future__ import annotations

import base64
import contextlib
import inspect
import json
import os
import shutil
import signal
import subprocess
import tempfile
import time
from collections.abc import Iterator
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import pytest
from websockets.exceptions import WebSocketException
from websockets.sync.client import ClientConnection, connect

from . import media_check as mc
from . import netns
from .conftest import require

START_TIMEOUT = 20.0  # until DevToolsActivePort is written (a cold start takes 1-3 s)
STOP_TIMEOUT = 5.0
COMMAND_TIMEOUT = 10.0  # one DevTools command
LOAD_TIMEOUT = 10.0  # a page load
TONE_RATE = 48000  # Chrome's fake capture reads the WAV at the rate of its audio path
TONE_SECONDS = 30  # longer than any call: the file loops anyway
CONSOLE_KEPT = 500  # console lines kept for explanations

# Debian's chromium as root, headless, WebRTC with a fake microphone, nothing off loopback.
# (PEERS.md: "Headless Chromium as a WebRTC client".)
FLAGS = (
    "--headless=new",
    "--no-sandbox",  # root cannot use the setuid/namespace sandbox
    "--use-fake-ui-for-media-stream",  # getUserMedia allowed without a prompt
    "--use-fake-device-for-media-stream",
    "--allow-loopback-in-peer-connection",  # 127.0.0.1 candidates are gathered and used
    "--autoplay-policy=no-user-gesture-required",  # the remote <audio> and AudioContext run
    "--remote-debugging-port=0",  # the port chosen is written to DevToolsActivePort
    "--proxy-server=http://127.0.0.1:9",  # any proxied request fails at once, locally
    "--host-resolver-rules=MAP * ~NOTFOUND , EXCLUDE 127.0.0.1",
    "--disable-background-networking",
    "--disable-features=WebRtcHideLocalIpsWithMdns,MediaRouter,OptimizationHints,Translate",
    "--ignore-certificate-errors",  # wss:// and https:// with the dev CA's certificate
    "--no-first-run",
    "--no-default-browser-check",
    "--disable-component-update",
    "--disable-sync",
    "--disable-gpu",
    "--disable-dev-shm-usage",
    "--password-store=basic",
    "--window-size=900,1100",
)


class BrowserError(AssertionError):
    """Chromium did not start, a DevTools command failed, or a page condition never held."""


def chromium_binary() -> str:
    """Debian's chromium; a skip without it (a failure under CI=true)."""
    return require("chromium")


def browser_tone(sox: str, path: Path, hz: float) -> Path:
    """The fake microphone's file: a sine of ``hz``, 48 kHz, 16-bit mono."""
    return mc.make_tone(sox, path, hz, TONE_SECONDS, rate=TONE_RATE)


@dataclass
class Chromium:
    """One headless Chromium with one page attached over DevTools."""

    proc: subprocess.Popen[bytes]
    profile: Path  # --user-data-dir, removed by stop()
    log_path: Path
    ws: ClientConnection | None = None
    session_id: str = ""  # the page's DevTools session (flattened into the browser socket)
    console: list[str] = field(default_factory=list)
    _next_id: int = 0

    # -- life cycle
    @classmethod
    def start(
        cls, workdir: Path, *, tone: Path | None = None, binary: str | None = None
    ) -> Chromium:
        """Start it (the fake microphone plays ``tone`` if given) and attach to a blank
        page; BrowserError with its log if it does not come up within START_TIMEOUT."""
        binary = binary or chromium_binary()
        workdir.mkdir(parents=True, exist_ok=True)
        profile = Path(tempfile.mkdtemp(prefix="chromium-", dir=workdir))
        log_path = workdir / f"{profile.name}.log"
        argv = [binary, *FLAGS, f"--user-data-dir={profile}"]
        if tone is not None:
            argv.append(f"--use-file-for-fake-audio-capture={tone}")
        argv.append("about:blank")
        with log_path.open("wb") as log:
            proc = subprocess.Popen(
                argv,
                stdin=subprocess.DEVNULL,
                stdout=log,
                stderr=log,
                start_new_session=True,  # its own process group: stop() ends exactly that
                env={**os.environ, "HOME": str(profile)},  # nothing written to the real home
            )
        browser = cls(proc=proc, profile=profile, log_path=log_path)
        try:
            browser._attach(browser._devtools_url())
        except BaseException:
            browser.stop()
            raise
        return browser

    def _devtools_url(self) -> str:
        """The browser's DevTools websocket, from the profile's DevToolsActivePort (its
        first line is the port, its second the path)."""
        active = self.profile / "DevToolsActivePort"
        deadline = time.monotonic() + START_TIMEOUT
        while time.monotonic() < deadline:
            if self.proc.poll() is not None:
                raise BrowserError(f"chromium exited with {self.proc.returncode}\n{self.log()}")
            lines = active.read_text().splitlines() if active.exists() else []
            if len(lines) >= 2 and lines[0].isdigit():
                return f"ws://127.0.0.1:{lines[0]}{lines[1]}"
            time.sleep(0.05)
        raise BrowserError(f"no {active} within {START_TIMEOUT} s\n{self.log()}")

    def _attach(self, url: str) -> None:
        """Connect to the browser, open a tab and attach to it (one socket, flat sessions)."""
        # No proxy from the environment (websockets 15 and later would use one), and entered
        # by hand (stop() closes it): websockets 17 warns about connect() used bare.
        options: dict[str, Any] = {"max_size": None, "open_timeout": COMMAND_TIMEOUT}
        if "proxy" in inspect.signature(connect).parameters:
            options["proxy"] = None
        self.ws = connect(url, **options).__enter__()
        target = self.send("Target.createTarget", {"url": "about:blank"}, page=False)
        attached = self.send(
            "Target.attachToTarget", {"targetId": target["targetId"], "flatten": True}, page=False
        )
        self.session_id = attached["sessionId"]
        for domain in ("Page", "Runtime", "Log"):
            self.send(f"{domain}.enable")

    def stop(self) -> str | None:
        """Close DevTools, SIGTERM the browser (it ends its helpers), SIGKILL whatever of
        its process group is left after STOP_TIMEOUT; the profile is removed. A complaint if
        it had to be killed."""
        problem = None
        if self.ws is not None:
            with contextlib.suppress(Exception):
                self.ws.close()
            self.ws = None
        if self.proc.poll() is None:
            self.proc.send_signal(signal.SIGTERM)  # the browser ends its helpers itself
            try:
                self.proc.wait(timeout=STOP_TIMEOUT)
            except subprocess.TimeoutExpired:
                problem = f"chromium not gone {STOP_TIMEOUT} s after SIGTERM; killed"
        # Its helpers (renderer, GPU, network, audio services) are in its process group,
        # which is its own (start_new_session): the group id is the browser's PID.
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=STOP_TIMEOUT)
        shutil.rmtree(self.profile, ignore_errors=True)
        return problem

    def kill(self) -> None:
        """SIGKILL its process group at once, as a crash would: the kernel closes its
        sockets (the SIP WebSocket goes without a close frame). ``stop()`` still cleans up."""
        with contextlib.suppress(ProcessLookupError):
            os.killpg(self.proc.pid, signal.SIGKILL)  # its own group (start_new_session)
        with contextlib.suppress(subprocess.TimeoutExpired):
            self.proc.wait(timeout=STOP_TIMEOUT)

    def log(self) -> str:
        """Chromium's own standard error (crashes, audio and network complaints)."""
        text = self.log_path.read_text(errors="replace") if self.log_path.exists() else ""
        return f"--- chromium log ({self.log_path}) ---\n{text[-6000:]}"

    # -- DevTools
    def send(
        self,
        method: str,
        params: dict[str, Any] | None = None,
        *,
        page: bool = True,
        timeout: float = COMMAND_TIMEOUT,
    ) -> dict[str, Any]:
        """One DevTools command (to the page's session unless ``page=False``): its result.
        Events that arrive meanwhile are recorded (console messages, exceptions)."""
        if self.ws is None:
            raise BrowserError("not attached to chromium")
        self._next_id += 1
        message: dict[str, Any] = {"id": self._next_id, "method": method, "params": params or {}}
        if page:
            message["sessionId"] = self.session_id
        try:
            self.ws.send(json.dumps(message))
            deadline = time.monotonic() + timeout
            while (remaining := deadline - time.monotonic()) > 0:
                try:
                    reply = json.loads(self.ws.recv(timeout=remaining))
                except TimeoutError:
                    break
                if reply.get("id") == self._next_id:
                    if "error" in reply:
                        raise BrowserError(f"{method}: {reply['error']}\n{self.explain()}")
                    return dict(reply.get("result", {}))
                self._event(reply)
        except (WebSocketException, OSError) as exc:
            raise BrowserError(
                f"{method}: DevTools connection lost: {exc!r}\n{self.log()}"
            ) from exc
        raise BrowserError(f"{method}: no answer within {timeout} s\n{self.explain()}")

    def _event(self, event: dict[str, Any]) -> None:
        """Keep what a failure message needs: console calls, exceptions, log entries."""
        method, params = event.get("method"), event.get("params", {})
        line = None
        if method == "Runtime.consoleAPICalled":
            args = " ".join(
                str(arg.get("value", arg.get("description", ""))) for arg in params.get("args", [])
            )
            line = f"console.{params.get('type')}: {args}"
        elif method == "Runtime.exceptionThrown":
            details = params.get("exceptionDetails", {})
            text = details.get("exception", {}).get("description") or details.get("text")
            line = f"exception: {text}"
        elif method == "Log.entryAdded" and params.get("entry", {}).get("level") != "verbose":
            entry = params["entry"]  # network errors, CSP and mixed-content complaints
            line = f"{entry.get('source')} {entry.get('level')}: {entry.get('text')} {entry.get('url', '')}"
        if line is not None:
            self.console.append(line)
            del self.console[:-CONSOLE_KEPT]

    # -- the page
    def open(self, url: str, timeout: float = LOAD_TIMEOUT) -> None:
        """Navigate the tab to ``url`` and wait until the document has loaded."""
        result = self.send("Page.navigate", {"url": url}, timeout=timeout)
        if result.get("errorText"):
            raise BrowserError(f"{url}: {result['errorText']}\n{self.explain()}")
        self.wait_for("document.readyState === 'complete'", timeout)

    def evaluate(self, expression: str, timeout: float = COMMAND_TIMEOUT) -> Any:
        """The value of a JavaScript expression in the page (a promise is awaited)."""
        result = self.send(
            "Runtime.evaluate",
            {"expression": expression, "awaitPromise": True, "returnByValue": True},
            timeout=timeout,
        )
        if "exceptionDetails" in result:
            details = result["exceptionDetails"]
            text = details.get("exception", {}).get("description") or details.get("text")
            raise BrowserError(f"{expression}: {text}\n{self.explain()}")
        return result.get("result", {}).get("value")

    def wait_for(self, expression: str, timeout: float, interval: float = 0.1) -> Any:
        """Until ``expression`` is truthy in the page: its value. BrowserError (with the
        console and the phone's log) after ``timeout``. An expression that throws (the page
        still loading) counts as not yet."""
        deadline = time.monotonic() + timeout
        last: Any = None
        while True:
            try:
                last = self.evaluate(expression, timeout=max(1.0, deadline - time.monotonic()))
                if last:
                    return last
            except BrowserError as exc:
                if "DevTools connection lost" in str(exc):
                    raise
                last = str(exc).splitlines()[0]
            if time.monotonic() >= deadline:
                raise BrowserError(
                    f"not true within {timeout} s: {expression} (last: {last!r})\n{self.explain()}"
                )
            time.sleep(interval)

    def screenshot(self, path: Path) -> Path:
        """A PNG of the page as it is rendered now."""
        data = self.send("Page.captureScreenshot", {"format": "png"})["data"]
        path.write_bytes(base64.b64decode(data))
        return path

    def phone_log(self) -> list[str]:
        """The page's ``phone.log`` (sbc/static/phone.js), or nothing if there is none."""
        try:
            return list(self.evaluate("window.phone ? window.phone.log : []", timeout=2.0) or [])
        except BrowserError:
            return []

    def explain(self) -> str:
        """What went on in the page: console messages, exceptions and the phone's log."""
        console = "\n".join(self.console[-100:])
        # Not through evaluate(): a failing evaluate explains itself with this very text.
        phone: list[str] = []
        if self.ws is not None and self.session_id:
            with contextlib.suppress(Exception):
                self._next_id += 1
                self.ws.send(
                    json.dumps(
                        {
                            "id": self._next_id,
                            "sessionId": self.session_id,
                            "method": "Runtime.evaluate",
                            "params": {
                                "expression": "window.phone ? window.phone.log.slice(-150) : []",
                                "returnByValue": True,
                            },
                        }
                    )
                )
                deadline = time.monotonic() + 2.0
                while (remaining := deadline - time.monotonic()) > 0:
                    reply = json.loads(self.ws.recv(timeout=remaining))
                    if reply.get("id") == self._next_id:
                        phone = list(reply.get("result", {}).get("result", {}).get("value") or [])
                        break
                    self._event(reply)
        return f"--- page console ---\n{console}\n--- phone.log ---\n" + "\n".join(phone)


@contextlib.contextmanager
def chromium(workdir: Path, *, tone: Path | None = None) -> Iterator[Chromium]:
    """A started Chromium, stopped (by its process group) at the end whatever happened; its
    log and the page's console are printed for the test report."""
    browser = Chromium.start(workdir, tone=tone)
    try:
        yield browser
    finally:
        explanation = ""
        with contextlib.suppress(Exception):
            explanation = browser.explain()
        problem = browser.stop()
        print(explanation)
        print(browser.log())
        if problem:
            print(problem)


@pytest.fixture
def webrtc_netns() -> Iterator[netns.Namespace]:
    """The test's thread inside a fresh namespace with only ``lo`` (see ``netns.isolated``):
    every process the test starts from now on (SBC, baresip, Chromium) sees loopback only.
    Ask for it first among a test's fixtures, so that its teardown comes last."""
    missing = netns.tools_missing()
    if missing:
        if os.environ.get("CI") == "true":
            pytest.fail(f"missing for network namespaces: {', '.join(missing)}")
        pytest.skip(f"missing for network namespaces: {', '.join(missing)}")
    with netns.isolated("sbc-webrtc") as ns:
        yield ns
