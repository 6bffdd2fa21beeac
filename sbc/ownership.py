"""Which signalling worker a message, a dialog or a connection belongs to.

With several workers (docs/architecture.md, "Signalling workers") the kernel hands a client's
datagrams to a worker by its address and port, and a connection to the worker that accepted
it. A call, a transaction and a connection live in one worker, so what comes back for them
must reach that worker. Three marks make that possible without any table shared between
workers:

- the branch of every request a worker sends begins with the magic cookie and ``w<index>.``
  (RFC 3261 8.1.1.7 only asks for the cookie and uniqueness): its responses are that
  worker's;
- the user part of the SBC's Contact on a call's legs (the call's id) begins with
  ``w<index>.``: the requests of the dialog (RFC 3261 12.2.1.1: sent to that Contact) are
  that worker's;
- a connection's id is ``serial * MAX_WORKERS + index``: data for it goes to that worker.

With one worker nothing is marked.
"""

from __future__ import annotations

from typing import Final

__all__ = ["MAX_WORKERS", "conn_id", "conn_owner", "marked_worker", "worker_tag"]

MAX_WORKERS: Final = 256


def worker_tag(index: int) -> str:
    """The mark of worker ``index`` at the start of a branch's token or a call id."""
    return f"w{index}."


def marked_worker(text: str, start: int = 0) -> int:
    """The worker whose mark ``text`` has at ``start``, or -1 if it has none."""
    if len(text) <= start + 2 or text[start] != "w":
        return -1
    dot = text.find(".", start + 1, start + 5)
    if dot < 0:
        return -1
    digits = text[start + 1 : dot]
    if not digits.isdigit() or not digits.isascii():
        return -1
    return int(digits)


def conn_id(serial: int, index: int) -> int:
    """The id of a worker's ``serial``-th connection (never 0: 0 means no connection)."""
    return serial * MAX_WORKERS + index


def conn_owner(conn: int) -> int:
    """The worker that holds connection ``conn`` (a connection id made by ``conn_id``)."""
    return conn % MAX_WORKERS
