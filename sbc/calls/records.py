# mypy: disable-error-code="misc"
# (a part of B2bua, one class of its single-inheritance chain: its methods take
# ``self: B2bua``, a subclass, which mypy reports as "misc")
"""Call records: one JSON line per ended INVITE call (docs/calls.md), written with the media
relay's statistics when they come within two seconds of the end."""

from __future__ import annotations

import json
import logging
from typing import TYPE_CHECKING

from sbc.calls.dialogs import Dialogs
from sbc.calls.model import (
    Call,
)

log = logging.getLogger("sbc.calls")

if TYPE_CHECKING:
    from sbc.calls.b2bua import B2bua


class Records(Dialogs):
    """B2bua's records (a part of the B2bua: ``self`` is the B2bua)."""

    def media_stats(self: B2bua, call_id: str, media: list[dict[str, object]]) -> None:
        """The relay's statistics of an ended call: its record is written with them."""
        call = self._awaiting_stats.pop(call_id, None)
        if call is not None:
            self._cancel_timer(call, "record")
            self.records.append(self._record(call, media))

    def _record(self: B2bua, call: Call, media: list[dict[str, object]] | None = None) -> str:
        """One JSON line per call, with its media statistics."""
        legs = [
            {"side": call.a_side, "call_id": call.a_request.call_id, "flow": str(call.a_flow)},
            {
                "side": call.target.side,
                "call_id": call.b_request.call_id if call.b_request else None,
                "flow": str(call.target.flow),
            },
        ]
        frm, to = call.a_request.from_, call.a_request.to
        wall = self.wall_offset
        ended = call.ended if call.ended is not None else call.started
        answered = call.answered
        return json.dumps({
            "call": call.id,
            "start": round(call.started + wall, 3),
            "answer": None if answered is None else round(answered + wall, 3),
            "end": round(ended + wall, 3),
            "duration": 0.0 if answered is None else round(ended - answered, 3),
            "from": None if frm is None else frm.uri_text,
            "to": None if to is None else to.uri_text,
            "status": call.status,
            "cause": call.cause,
            "backend": call.target.backend.name if call.target.backend else None,
            "legs": legs,
            "transcoded_streams": call.transcoded,
            "media": media,
        }, separators=(",", ":"))  # fmt: skip
