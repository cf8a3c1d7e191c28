"""Realistic event streams for projector tests, produced by the real domain
(decide + evolve) exactly as the command API would append them."""

from __future__ import annotations

import random
from dataclasses import dataclass, field
from datetime import UTC, datetime, timedelta
from uuid import UUID, uuid4

from commands import domain
from contract import AggregateType, EventEnvelope, EventMetadata
from projectors.projection import Delivery
from saga.steps import SAGA_USER


@dataclass
class World:
    """One tenant's history: users, a definition, workflows in every status."""

    tenant_id: UUID = field(default_factory=uuid4)
    events: list[EventEnvelope] = field(default_factory=list)
    states: dict[UUID, domain.AggregateState] = field(default_factory=dict)
    clock: datetime = field(default_factory=lambda: datetime(2026, 11, 2, 9, 0, tzinfo=UTC))

    def run(self, actor: domain.Actor, command: domain.Command,
            aggregate_id: UUID | None = None) -> UUID:
        aggregate_id = aggregate_id or uuid4()
        state = self.states.get(aggregate_id) or domain.initial_state(
            command.aggregate_type, aggregate_id)
        self.clock += timedelta(minutes=7)
        for event in domain.decide(command, state, actor, self.clock):
            state = domain.evolve(state, event)
            self.events.append(EventEnvelope(
                event_type=event.event_type, aggregate_type=AggregateType(command.aggregate_type),
                aggregate_id=aggregate_id, version=state.version, occurred_at=self.clock,
                payload=event.payload, aggregate=state.snapshot(),
                metadata=EventMetadata(tenant_id=self.tenant_id, user_id=actor.user_id,
                                       correlation_id=uuid4())))
        self.states[aggregate_id] = state
        return aggregate_id

    def workflow(self, workflow_id: UUID) -> domain.WorkflowState:
        state = self.states[workflow_id]
        assert isinstance(state, domain.WorkflowState)
        return state


def build_world(workflows: int = 12, seed: int = 7) -> World:
    rng = random.Random(seed)
    world = World()
    admin = domain.Actor(uuid4(), "管理者", ("admin",))
    people = []
    for name in ("申請 太郎", "承認 一郎", "承認 二郎", "代理 三郎"):
        person = domain.Actor(uuid4(), name, ("user",))
        world.run(admin, domain.RegisterUser(name, f"{person.user_id.hex[:6]}@example.jp"),
                  person.user_id)
        people.append(person)
    initiator, first, second, deputy = people
    world.run(second, domain.SetNotificationPreferences(
        "en", ("email", "chat"), "https://chat.example/hooks/1"), second.user_id)
    saga = domain.Actor(SAGA_USER, "completion saga", ("system",))
    definition = world.run(admin, domain.CreateDefinition("経費精算", (
        domain.StepTemplate("課長承認", first.user_id),
        domain.StepTemplate("部長承認", second.user_id))))
    steps = (domain.ResolvedStep("課長承認", first.user_id, first.name),
             domain.ResolvedStep("部長承認", second.user_id, second.name))
    by_id = {p.user_id: p for p in people}
    for n in range(workflows):
        wf = world.run(initiator, domain.CreateWorkflow(
            definition, "経費精算", steps, f"出張旅費 {n} 大阪", "新幹線と宿泊",
            rng.choice(["low", "medium", "high", "urgent"]),
            world.clock + timedelta(hours=rng.randint(1, 240)) if n % 3 else None))
        path = n % 6
        if path == 0:
            continue  # stays a draft
        world.run(initiator, domain.SubmitWorkflow(), wf)
        world.run(initiator, domain.AddComment(f"よろしくお願いします {n}"), wf)
        step1, step2 = (s.step_id for s in world.workflow(wf).steps)
        if path == 1:
            continue  # waits for the first approver
        if path == 2:
            world.run(first, domain.RejectStep(step1, "予算超過"), wf)
        elif path == 3:
            world.run(first, domain.DelegateStep(step1, deputy.user_id, deputy.name, "出張中"), wf)
            world.run(deputy, domain.ApproveStep(step1), wf)
        elif path == 4:
            world.run(first, domain.RequestChanges(step1, "領収書を"), wf)
            world.run(initiator, domain.ResubmitWorkflow("添付しました"), wf)
            world.run(first, domain.ApproveStep(step1), wf)
            current = world.workflow(wf).current_step
            assert current is not None
            world.run(by_id[current.assignee_id], domain.ApproveStep(step2), wf)
            # The completion saga: every other one completes, the rest are compensated.
            world.run(saga, domain.FinalizeDocuments(), wf)
            if n % 12 == 4:
                world.run(saga, domain.RecordCompletion(skipped_steps=("sync",)), wf)
            else:
                world.run(saga, domain.UnfinalizeDocuments("sync refused: 400"), wf)
                world.run(saga, domain.RecordCompletion(failed_step="sync",
                                                        reason="400 Bad Request"), wf)
        else:
            world.run(initiator, domain.CancelWorkflow("不要になりました"), wf)
    # Renames after the workflows copied the old names: projections must catch up.
    world.run(first, domain.RenameUser("承認 一郎(課長)"), first.user_id)
    world.run(initiator, domain.RenameUser("申請 花子"), initiator.user_id)
    return world


def in_order(events: list[EventEnvelope], batch: int = 25) -> list[list[Delivery]]:
    deliveries = [Delivery(e) for e in events]
    return [deliveries[i:i + batch] for i in range(0, len(deliveries), batch)]


def chaotic(events: list[EventEnvelope], seed: int = 3) -> list[list[Delivery]]:
    """Every event one to three times in shuffled batches (so earlier versions of
    an aggregate often arrive after later ones, as on a re-drive), then a full
    replay, then shuffled redeliveries again: whatever arrives last is as likely
    old as new."""
    rng = random.Random(seed)

    def shuffled() -> list[list[Delivery]]:
        deliveries = [Delivery(e) for e in events for _ in range(rng.randint(1, 3))]
        rng.shuffle(deliveries)
        batches, i = [], 0
        while i < len(deliveries):
            size = rng.randint(1, 40)
            batches.append(deliveries[i:i + size])
            i += size
        return batches

    return shuffled() + in_order(events, batch=60) + shuffled()
