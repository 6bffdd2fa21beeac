"""The sides of the SBC. Every flow, leg and media party is on one of them: the access side
(the customers' SIP clients, mostly behind NAT), the core (the provider's registrars and
call servers, the backends) or a peer (another SBC, reached over mutual TLS)."""

from __future__ import annotations

import enum


class Side(enum.StrEnum):
    """A StrEnum: its values are the config's and the call records' names for the sides."""

    ACCESS = "access"
    CORE = "core"
    PEER = "peer"


ACCESS = Side.ACCESS
CORE = Side.CORE
PEER = Side.PEER
