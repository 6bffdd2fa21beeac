"""Calls through the SBC: the back-to-back user agent, split by concern.

- ``model``: calls, legs, targets, the call policy, the media seam, header lists;
- ``b2bua``: the entry points (a new request, responses and timeouts of what it sent) and
  what the first answers of a call do (forks, the 2xx, failures);
- ``routing``: where a request goes (new ones, and within a dialog), admission;
- ``mapping``: what crosses between the legs (responses, headers, bodies, Replaces);
- ``dialogs``: requests within a call, the ACK, CANCEL, DTMF interworking;
- ``teardown``: how calls end and what is forgotten;
- ``timers``: the call's timers in one ``Deadlines``;
- ``records``: the call records.

The parts are classes of one single-inheritance chain, each the base of the next
(``Teardown`` <- ``Dialogs`` <- ``Records`` <- ``CallTimers`` <- ``Mapping`` <- ``Routing``
<- ``B2bua``; the method resolution order the mixins had), because mypyc, which compiles
them, supports no other multiple inheritance than of traits. Their methods take
``self: B2bua``: each part uses the state and the methods of the others.
"""

from sbc.calls.b2bua import B2bua
from sbc.calls.model import (
    DEFAULT_POLICY,
    Call,
    CallPolicy,
    Leg,
    MediaSeam,
    PassThroughMedia,
    PeerRoute,
    Refusal,
    Target,
)

__all__ = [
    "DEFAULT_POLICY",
    "B2bua",
    "Call",
    "CallPolicy",
    "Leg",
    "MediaSeam",
    "PassThroughMedia",
    "PeerRoute",
    "Refusal",
    "Target",
]
