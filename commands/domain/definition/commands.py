"""What may be asked of a definition."""

from __future__ import annotations

from dataclasses import dataclass
from typing import ClassVar

from commands.domain.definition.state import StepTemplate


@dataclass(frozen=True)
class CreateDefinition:
    aggregate_type: ClassVar[str] = "definition"
    name: str
    steps: tuple[StepTemplate, ...]
    description: str | None = None
