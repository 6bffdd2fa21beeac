"""Command line: ``sbc run``, ``sbc check-config``, ``sbc gen-certs``, ``sbc status``,
``sbc reload``, ``sbc audit``, ``sbc --version``; ``sbc worker`` is what ``sbc run`` starts for each
signalling worker."""

from __future__ import annotations

import argparse
import json
import os
import signal
import sys
import time
import urllib.error
import urllib.parse
import urllib.request
from collections.abc import Callable
from pathlib import Path
from typing import Any

from sbc import __version__
from sbc.config import AdminConfig, Config, ConfigError, HostPort, load_config

__all__ = ["main"]


def _error(message: str) -> int:
    print(f"sbc: error: {message}", file=sys.stderr)
    return 1


def _load(path: str) -> Config | None:
    try:
        return load_config(path)
    except ConfigError as exc:
        for line in exc.errors:
            print(line, file=sys.stderr)
        return None


def _cmd_run(args: argparse.Namespace) -> int:
    config = _load(args.config)
    if config is None:
        return 1
    from sbc.log import setup_logging

    setup_logging(config.log.level, config.log.format)
    # Imported here: check-config and gen-certs need none of the runtime.
    from sbc.app import StartupError
    from sbc.app import run as run_app

    try:
        return run_app(config, args.config)
    except StartupError as exc:
        return _error(str(exc))
    except KeyboardInterrupt:
        return 130


def _cmd_worker(args: argparse.Namespace) -> int:
    """One signalling worker, started by ``sbc run``'s supervisor ([sbc] workers > 1)."""
    from sbc.io.supervisor import SECRET_ENV, set_parent_death_signal

    # A reload passed on while this worker starts must not kill it (SIGHUP's default):
    # ignored until the event loop takes SIGHUP over.
    signal.signal(signal.SIGHUP, signal.SIG_IGN)
    set_parent_death_signal(args.parent)
    secret = bytes.fromhex(os.environ.pop(SECRET_ENV, ""))  # not for the media workers
    config = _load(args.config)
    if config is None:
        return 1
    from sbc.log import setup_logging

    setup_logging(config.log.level, config.log.format, worker=args.index)
    from sbc.app import StartupError, WorkerRole, run_worker

    role = WorkerRole(
        index=args.index,
        count=args.workers,
        secret=secret,
        runtime=args.runtime,
        ready_fd=args.ready_fd,
        restarted=args.restarted,
    )
    try:
        return run_worker(config, args.config, role)
    except StartupError as exc:
        return _error(str(exc))
    except KeyboardInterrupt:
        return 130


def _cmd_check_config(args: argparse.Namespace) -> int:
    if _load(args.file) is None:
        return 1
    print(f"{args.file}: ok")
    return 0


def _cmd_gen_certs(args: argparse.Namespace) -> int:
    from sbc.certs import generate_dev_certs

    try:
        paths = generate_dev_certs(
            Path(args.out),
            hostnames=args.hostname,
            ips=args.ip,
            days=args.days,
            force=args.force,
        )
    except FileExistsError as exc:
        return _error(f"{exc} (use --force)")
    except (ValueError, OSError) as exc:
        return _error(str(exc))
    for path in paths.values():
        print(path)
    return 0


STATUS_TIMEOUT = 5.0  # seconds for the admin API to answer ``sbc status``
RELOAD_TIMEOUT = 5.0  # seconds for the SBC to report a reload


def _admin_url(args: argparse.Namespace) -> str | None:
    """http://HOST:PORT of the admin API from --admin or the config's [admin] listen; a
    wildcard listen address is reached on loopback."""
    if args.admin is not None:
        try:
            where = HostPort.parse(args.admin)
        except ValueError as exc:
            print(f"sbc: error: --admin {args.admin}: {exc}", file=sys.stderr)
            return None
    elif args.config is not None:
        config = _load(args.config)
        if config is None:
            return None
        where = config.admin.listen
    else:
        where = AdminConfig().listen
    host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(where.host, where.host)
    return f"http://{HostPort(host=host, port=where.port)}"


def _fmt_status(report: dict[str, Any]) -> str:
    regs, calls, bans = report["registrations"], report["calls"], report["bans"]
    lines = [
        f"{report['name']} (sbc {report['version']}): "
        + ("ready" if report["ready"] else f"not ready: {report['reason']}"),
        f"registrations: {regs['relayed']} relayed, {regs['local']} local",
        f"calls: {calls['active']} active; {calls['started']} started, "
        f"{calls['answered']} answered, {calls['ended']} ended, {calls['refused']} refused",
    ]
    backends = report["backends"]
    if not backends:
        lines.append("backends: none (embedded registrar)")
    else:
        up = sum(1 for b in backends if b["up"])
        lines.append(f"backends: {up} of {len(backends)} up")
        lines += _probed_lines(backends, "name", lambda b: f"dialogs {b['dialogs']:<5}")
    nodes = report.get("rtpengine") or []
    if nodes:
        up = sum(1 for n in nodes if n["up"])
        lines.append(f"rtpengine: {up} of {len(nodes)} node(s) up")
        lines += _probed_lines(
            nodes, "url", lambda n: f"weight {n['weight']:<3}  calls {n['calls']:<5}"
        )
    lines.append(f"bans: {bans['active']} source(s) banned now")
    workers = report.get("workers")
    if workers:
        restarts = sum(w["restarts"] for w in workers)
        lines.append(f"workers: {len(workers)}, restarted {restarts} time(s)")
        for w in workers:
            state = "ready" if w["ready"] else "running" if w["running"] else "down"
            uptime = "-" if w["uptime"] is None else f"{w['uptime']:.0f} s"
            lines.append(
                f"  worker {w['index']}  pid {w['pid']}  {state:<7}  up {uptime:<7}  "
                f"registrations {w['registrations']}  calls {w['calls_active']} active, "
                f"{w['calls_started']} started"
            )
    return "\n".join(lines)


def _probed_lines(
    items: list[dict[str, Any]], key: str, middle: Callable[[dict[str, Any]], str]
) -> list[str]:
    """One line per backend or rtpengine node: its name, state, ``middle``, round trip."""
    width = max(len(item[key]) for item in items)
    lines = []
    for item in items:
        rtt = "-" if item["rtt_ms"] is None else f"{item['rtt_ms']:.1f} ms"
        state = "up" if item["up"] else "down"
        lines.append(f"  {item[key]:<{width}}  {state:<4}  {middle(item)}  rtt {rtt}")
    return lines


def _fetch_status(base: str) -> dict[str, Any] | str:
    """The running SBC's /status JSON, or why it could not be had."""
    url = f"{base}/status"
    try:
        # No proxy: the admin API is local (or on a management network), never proxied.
        opener = urllib.request.build_opener(urllib.request.ProxyHandler({}))
        with opener.open(url, timeout=STATUS_TIMEOUT) as response:
            report = json.loads(response.read())
    except urllib.error.HTTPError as exc:
        return f"{url} answered {exc.code} {exc.reason}"
    except (urllib.error.URLError, OSError) as exc:
        reason = exc.reason if isinstance(exc, urllib.error.URLError) else exc
        return f"no answer from the SBC's admin API at {base}: {reason}"
    except ValueError as exc:
        return f"{url} did not answer JSON: {exc}"
    if not isinstance(report, dict):
        return f"{url}: unexpected report"
    return report


def _running(args: argparse.Namespace) -> tuple[str, dict[str, Any]] | None:
    """The admin API's base URL and the running SBC's /status, or None (said why)."""
    base = _admin_url(args)
    if base is None:
        return None
    report = _fetch_status(base)
    if isinstance(report, str):
        _error(report)
        return None
    return base, report


def _cmd_status(args: argparse.Namespace) -> int:
    running = _running(args)
    if running is None:
        return 1
    base, report = running
    if args.json:
        print(json.dumps(report, indent=1))
    else:
        try:
            print(_fmt_status(report))
        except (KeyError, TypeError, ValueError) as exc:
            return _error(f"{base}/status: unexpected report ({exc!r})")
    return 0


def _cmd_reload(args: argparse.Namespace) -> int:
    """Check the config, then SIGHUP the running SBC (found through its admin API) and
    report whether it took the new config or refused it, with the reason.
    """
    if _load(args.config) is None:
        return 1  # the errors are printed; the running SBC would refuse it as well
    running = _running(args)
    if running is None:
        return 1
    base, report = running
    host = urllib.parse.urlsplit(base).hostname or ""
    if host not in ("127.0.0.1", "::1", "localhost") and not host.startswith("127."):
        # The SBC is signalled by its process id: only one on this machine is the one.
        return _error(f"sbc reload works on this machine's SBC (admin on loopback), not {base}")
    started = (report.get("reload") or {}).get("path")
    if started and Path(str(started)).resolve() != Path(args.config).resolve():
        return _error(
            f"the SBC re-reads the file it was started with, {started}, not {args.config}"
        )
    try:
        pid = int(report["pid"])
        before = int((report.get("reload") or {})["generation"])
    except (KeyError, TypeError, ValueError):
        return _error(f"{base}/status has no pid or reload state: an older SBC?")
    try:
        os.kill(pid, signal.SIGHUP)
    except OSError as exc:
        return _error(f"cannot signal the SBC (pid {pid}): {exc.strerror or exc}")
    deadline = time.monotonic() + RELOAD_TIMEOUT
    while time.monotonic() < deadline:
        time.sleep(0.1)
        now = _fetch_status(base)
        if isinstance(now, str):
            continue
        state = now.get("reload") or {}
        if int(state.get("generation", 0)) > before:
            if state.get("ok"):
                print(f"sbc: reloaded {started or args.config} (pid {pid})")
                return 0
            return _error(f"reload refused, the running config stays: {state.get('error')}")
    return _error(f"the SBC (pid {pid}) did not report the reload within {RELOAD_TIMEOUT:g} s")


# Exit codes of ``sbc audit``: a cell of --require not protected, a live check that
# contradicts the config (both: the first).
AUDIT_UNMET = 3
AUDIT_CONTRADICTED = 4


def _cmd_audit(args: argparse.Namespace) -> int:
    """The deployment's security matrix (sbc/audit.py), with --live checked against the
    running SBC (sbc/io/audit_live.py); --require fails on cells not protected."""
    import tomllib

    from sbc import audit

    config = _load(args.config)
    if config is None:
        return 1
    required: list[audit.Requirement] = []
    if args.require:
        try:
            with open(args.require, "rb") as f:
                required = audit.requirements(tomllib.load(f))
        except (OSError, tomllib.TOMLDecodeError, ValueError) as exc:
            return _error(f"{args.require}: {exc}")
    cells = audit.matrix(config)
    live: list[dict[str, object]] | None = None
    if args.live:
        from sbc.io import audit_live

        # The SBC of this config must run: its admin API answers (else every probe would
        # read as a contradiction).
        where = config.admin.listen
        host = {"0.0.0.0": "127.0.0.1", "::": "::1"}.get(where.host, where.host)
        running = _fetch_status(f"http://{HostPort(host=host, port=where.port)}")
        if isinstance(running, str):
            return _error(f"--live: {running}")
        live = audit_live.run(config)
    if args.format == "json":
        data = audit.report(config, args.config)
        if live is not None:
            data["live"] = live
        print(audit.to_json(data))
    elif args.format == "markdown":
        print(audit.render_markdown(cells, args.config, live), end="")
    else:
        print(audit.render_text(cells, args.config, live), end="")
    unmet = audit.unmet(cells, required)
    for line in unmet:
        print(f"sbc audit: required but not protected: {line}", file=sys.stderr)
    contradicted = [c for c in live or [] if c["result"] == "contradicts"]
    for check in contradicted:
        print(
            f"sbc audit: the running SBC contradicts its config: {check['name']}: "
            f"{check['observed']} (expected: {check['expected']})",
            file=sys.stderr,
        )
    if unmet:
        return AUDIT_UNMET
    return AUDIT_CONTRADICTED if contradicted else 0


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sbc", description="Session Border Controller")
    parser.add_argument("--version", action="version", version=f"sbc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the SBC until SIGTERM/SIGINT")
    run.add_argument("--config", required=True, metavar="FILE", help="TOML config file")
    run.set_defaults(func=_cmd_run)

    worker = sub.add_parser(
        "worker", help="one signalling worker (started by 'sbc run' when [sbc] workers > 1)"
    )
    worker.add_argument("--config", required=True, metavar="FILE")
    worker.add_argument("--index", required=True, type=int, metavar="I")
    worker.add_argument("--workers", required=True, type=int, metavar="N")
    worker.add_argument("--runtime", required=True, metavar="DIR", help="the workers' sockets")
    worker.add_argument("--restarted", action="store_true", help="the other workers run")
    worker.add_argument("--ready-fd", type=int, default=None, metavar="FD")
    worker.add_argument("--parent", required=True, type=int, metavar="PID")
    worker.set_defaults(func=_cmd_worker)

    check = sub.add_parser("check-config", help="validate a config file and exit")
    check.add_argument("file", metavar="FILE")
    check.set_defaults(func=_cmd_check_config)

    gen = sub.add_parser("gen-certs", help="write a development CA, server and client cert")
    gen.add_argument("--out", required=True, metavar="DIR", help="output directory")
    gen.add_argument(
        "--hostname",
        action="append",
        default=[],
        metavar="NAME",
        help="DNS name for the server certificate (repeatable; localhost is always added)",
    )
    gen.add_argument(
        "--ip",
        action="append",
        default=[],
        metavar="IP",
        help="IP address for the server certificate (repeatable; 127.0.0.1 and ::1 are added)",
    )
    gen.add_argument("--days", type=int, default=825, help="validity in days (default 825)")
    gen.add_argument("--force", action="store_true", help="overwrite existing files")
    gen.set_defaults(func=_cmd_gen_certs)

    status = sub.add_parser(
        "status", help="print registrations, calls and backends of a running SBC"
    )
    where = status.add_mutually_exclusive_group()
    where.add_argument(
        "--admin", metavar="HOST:PORT", help="the admin API's address (default: from --config)"
    )
    where.add_argument(
        "--config",
        metavar="FILE",
        help="read [admin] listen from this config (default: 127.0.0.1:8080, its default)",
    )
    status.add_argument("--json", action="store_true", help="print the /status JSON as is")
    status.set_defaults(func=_cmd_status)

    reload = sub.add_parser(
        "reload", help="check a config and make the running SBC take it (SIGHUP)"
    )
    reload.add_argument("--config", required=True, metavar="FILE", help="the SBC's config file")
    reload.add_argument(
        "--admin", metavar="HOST:PORT", help="the admin API's address (default: from --config)"
    )
    reload.set_defaults(func=_cmd_reload)

    audit = sub.add_parser(
        "audit", help="the deployment's security matrix, from its config (and --live, checked)"
    )
    audit.add_argument("--config", required=True, metavar="FILE", help="the SBC's config file")
    audit.add_argument(
        "--live", action="store_true", help="check the cells against the running SBC too"
    )
    audit.add_argument("--format", choices=("text", "json", "markdown"), default="text")
    audit.add_argument(
        "--require",
        metavar="FILE",
        help=f"TOML of [[require]] cells that must be protected (exit {AUDIT_UNMET} if not)",
    )
    audit.set_defaults(func=_cmd_audit)
    return parser


def main(argv: list[str] | None = None) -> int:
    parser = _parser()
    try:
        args = parser.parse_args(argv)
    except SystemExit as exc:  # --help, --version, usage errors
        return exc.code if isinstance(exc.code, int) else 0
    if args.command is None:
        parser.print_help(sys.stderr)
        return 2
    code: int = args.func(args)
    return code
