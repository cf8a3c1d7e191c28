"""What may be asked of a user."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar


@dataclass(frozen=True)
class RegisterUser:
    aggregate_type: ClassVar[str] = "user"
    display_name: str
    email: str


@dataclass(frozen=True)
class RenameUser:
    aggregate_type: ClassVar[str] = "user"
    display_name: str
