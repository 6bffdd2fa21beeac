"""Client registrations through the SBC: the REGISTER proxy towards the backends (with
offload, failover, de-registration and recovery), the embedded registrar's glue, and the
keep-alives to registered clients behind NAT (docs/registration.md)."""

from sbc.registration.keepalives import NatKeepalives, RawSend
from sbc.registration.proxy import DEFAULT_OFFLOAD, OffloadPolicy, RegistrationProxy

__all__ = ["DEFAULT_OFFLOAD", "NatKeepalives", "OffloadPolicy", "RawSend", "RegistrationProxy"]
