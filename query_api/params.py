"""Query parameter types stricter than pydantic's lax defaults.

A plain `datetime` query parameter accepts `0.5` or `1700000000` as a Unix time
(pydantic's lax mode), so `due_before=0.5` silently filtered by 1970. The API
documents ISO 8601 date-times with a time zone, and takes nothing else."""

from __future__ import annotations

import re
from typing import Annotated, Any

from pydantic import AwareDatetime, BeforeValidator

# A date, a time of at least hours and minutes (the zone is checked by AwareDatetime).
_ISO_DATETIME = re.compile(r"\d{4}-\d{2}-\d{2}[Tt ]\d{2}:\d{2}")


def _iso_8601_only(value: Any) -> Any:
    if isinstance(value, str) and not _ISO_DATETIME.match(value):
        raise ValueError("must be an ISO 8601 date-time with a time zone, "
                         "e.g. 2026-11-01T09:00:00Z or 2026-11-01T18:00:00+09:00")
    return value


IsoDateTime = Annotated[AwareDatetime, BeforeValidator(_iso_8601_only)]
