"""Command line: ``sbc run``, ``sbc check-config``, ``sbc gen-certs``, ``sbc --version``."""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from sbc import __version__
from sbc.config import Config, ConfigError, load_config

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
        return run_app(config)
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


def _parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(prog="sbc", description="Session Border Controller")
    parser.add_argument("--version", action="version", version=f"sbc {__version__}")
    sub = parser.add_subparsers(dest="command", metavar="COMMAND")

    run = sub.add_parser("run", help="run the SBC until SIGTERM/SIGINT")
    run.add_argument("--config", required=True, metavar="FILE", help="TOML config file")
    run.set_defaults(func=_cmd_run)

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
