"""A definition's state, folded from its events."""

from __future__ import annotations

from collections.abc import Iterable
from dataclasses import dataclass
from datetime import datetime
from uuid import UUID

from commands.domain.common import iso_or_none, str_or_none
from contract import DefinitionSnapshot, StepTemplateSnapshot


@dataclass(frozen=True)
class StepTemplate:
    """A definition step: who decides it. Its order is its position in the definition."""

    name: str
    assignee_id: UUID


@dataclass(frozen=True)
class DefinitionState:
    id: UUID
    version: int = 0  # 0: not created yet
    name: str = ""
    description: str | None = None
    steps: tuple[StepTemplate, ...] = ()
    created_by_id: UUID | None = None
    created_by_name: str = ""
    created_at: datetime | None = None

    def snapshot(self) -> DefinitionSnapshot:
        return {
            "id": str(self.id),
            "version": self.version,
            "name": self.name,
            "description": self.description,
            "steps": template_payloads(self.steps),
            "created_by_id": str_or_none(self.created_by_id),
            "created_by_name": self.created_by_name,
            "created_at": iso_or_none(self.created_at),
        }


def template_payloads(steps: Iterable[StepTemplate]) -> list[StepTemplateSnapshot]:
    return [StepTemplateSnapshot(order=order, name=step.name, assignee_id=str(step.assignee_id))
            for order, step in enumerate(steps, start=1)]
