"""What each step of the completion saga does, and how it fails: `TryLater` (the
database, broker or receiver may take it later: retried with backoff within the step's
budget) or `StepFailed` (refused for good: the saga compensates).

Every step is idempotent, so a step redone after a crash (its outcome not yet recorded)
changes nothing twice: commands carry an Idempotency-Key per saga run and step (the
command path answers a repeat with the first answer), notifications carry deterministic
ids (the dispatcher's ledger sends each once), and the webhook carries an
Idempotency-Key header for the receiver to do the same."""

from __future__ import annotations

import hashlib
import hmac
from dataclasses import dataclass
from typing import Any
from uuid import NAMESPACE_URL, uuid5

import httpx
import orjson
import psycopg
from confluent_kafka import KafkaException, Producer
from psycopg_pool import AsyncConnectionPool

from commands import domain, handlers
from commands.service import CommandContext, Writer
from contract import NOTIFICATION_COMMANDS, AggregateType, NotificationCommand
from infra.auth import Principal
from infra.settings import Settings
from saga.store import Completion

# The saga's own identity in the events it causes (role "system": the only one the
# completion commands accept).
SAGA_USER = uuid5(NAMESPACE_URL, "ringiflow:workflow-completion-saga")
SIGNATURE_HEADER = "X-RingiFlow-Signature"


class TryLater(Exception):
    pass


class StepFailed(Exception):
    pass


def signature(secret: str, body: bytes) -> str:
    """`sha256=<hex>`: HMAC-SHA256 of the exact body bytes under the tenant's secret."""
    return "sha256=" + hmac.new(secret.encode(), body, hashlib.sha256).hexdigest()


@dataclass
class Effects:
    """The saga's ways of touching the world."""

    settings: Settings
    commands: AsyncConnectionPool  # the command role: the saga's commands go the command path
    producer: Producer
    http: httpx.AsyncClient

    def key(self, saga: Completion, step: str) -> str:
        return f"completion:{saga.workflow_id}:{saga.run}:{step}"

    async def command(self, saga: Completion, step: str, command: domain.Command) -> dict:
        key = self.key(saga, step)
        principal = Principal(saga.tenant_id, SAGA_USER, "completion saga", ("system",),
                              kind="service")
        ctx = CommandContext(principal, uuid5(NAMESPACE_URL, key), saga.workflow_id, "", key,
                             None, f"saga {key} {command!r}")
        try:
            outcome = await handlers.on_workflow(Writer(self.commands), ctx, saga.workflow_id,
                                                 command)
        except domain.DomainError as exc:
            raise StepFailed(f"{type(command).__name__} refused: {exc}") from exc
        except (psycopg.OperationalError, psycopg.errors.SerializationFailure) as exc:
            raise TryLater(f"event store: {exc}") from exc
        return {"version": outcome.body["version"], "event_ids": outcome.body["event_ids"]}

    async def workflow(self, saga: Completion) -> dict[str, Any]:
        try:
            async with self.commands.connection() as conn:
                cur = await conn.execute(
                    "SELECT aggregate FROM event_store.latest_snapshots(%s, %s, %s)",
                    (saga.tenant_id, AggregateType.WORKFLOW.value, [saga.workflow_id]))
                row = await cur.fetchone()
        except psycopg.OperationalError as exc:
            raise TryLater(f"event store: {exc}") from exc
        if row is None:
            raise StepFailed(f"workflow {saga.workflow_id} is not in the event store")
        snapshot: dict[str, Any] = row[0]
        return snapshot

    async def notify(self, saga: Completion, step: str, kind: str,
                     comment: str | None = None) -> dict:
        """`kind` to the initiator and every approver (once each), by deterministic id."""
        workflow = await self.workflow(saga)
        recipients = dict.fromkeys([workflow["initiator_id"]] + [
            s["assignee_id"] for s in workflow["steps"] if s.get("decision")])
        errors: list[Any] = []
        for user in recipients:
            notification_id = str(uuid5(NAMESPACE_URL, f"{self.key(saga, step)}:{user}"))
            command = NotificationCommand(
                notification_id=notification_id, type=kind, user_id=user,
                tenant_id=str(saga.tenant_id), workflow_id=str(saga.workflow_id),
                title=workflow["title"], step_name=None, comment=comment, due_date=None,
                caused_by=self.key(saga, step))
            try:
                self.producer.produce(
                    NOTIFICATION_COMMANDS.name, orjson.dumps(command), user.encode(),
                    headers=[("record_id", notification_id.encode()),
                             ("tenant_id", str(saga.tenant_id).encode())],
                    on_delivery=lambda err, _m: errors.append(err) if err else None)
            except (BufferError, KafkaException) as exc:
                raise TryLater(f"broker: {exc}") from exc
        if self.producer.flush(self.settings.saga_step_timeout_s) or errors:
            raise TryLater(f"notification commands not acknowledged: {errors[:2]}")
        return {"recipients": len(recipients)}

    async def post(self, saga: Completion, step: str, event: str) -> dict:
        """The signed webhook to the tenant's external system, if it has one."""
        hook = self.settings.completion_webhooks.get(str(saga.tenant_id))
        if hook is None:
            return {"status": "skipped", "reason": "no external endpoint configured for "
                    "the tenant (RINGIFLOW_COMPLETION_WEBHOOKS)"}
        workflow = await self.workflow(saga)
        body = orjson.dumps({
            "event": event, "tenant_id": str(saga.tenant_id),
            "workflow_id": str(saga.workflow_id), "title": workflow["title"],
            "completed_at": workflow.get("completed_at"),
            "manifest_sha256": workflow.get("manifest_sha256"),
            "documents": [{"document_id": d["document_id"], "filename": d["filename"],
                           "sha256": d["sha256"]} for d in workflow["documents"]]})
        key = self.key(saga, step)
        try:
            response = await self.http.post(
                hook["url"], content=body, timeout=self.settings.saga_step_timeout_s,
                headers={"Content-Type": "application/json", "Idempotency-Key": key,
                         SIGNATURE_HEADER: signature(hook["secret"], body)})
        except httpx.HTTPError as exc:
            raise TryLater(f"{hook['url']}: {type(exc).__name__}: {exc}") from exc
        answer = f"{hook['url']} answered {response.status_code}: {response.text[:200]}"
        if response.status_code < 300:
            return {"status_code": response.status_code}
        if response.status_code in (408, 429) or response.status_code >= 500:
            raise TryLater(answer)
        raise StepFailed(answer)


def failure_of(saga: Completion) -> tuple[str, str]:
    """(the forward step that failed, why)."""
    for name, outcome in saga.steps.items():
        if outcome.get("status") == "failed" and name in ("finalize", "notify", "sync"):
            return name, outcome.get("error", "unknown")
    return "unknown", saga.last_error or "unknown"


async def run_step(effects: Effects, saga: Completion, step: str) -> dict[str, Any]:
    """Do `step`; its outcome (status "done" or "skipped", and details)."""
    if step == "finalize":
        return await effects.command(saga, step, domain.FinalizeDocuments())
    if step == "notify":
        return await effects.notify(saga, step, "WorkflowCompleted")
    if step == "sync":
        return await effects.post(saga, step, "workflow.completed")
    if step == "withdraw":
        return await effects.post(saga, step, "workflow.completion_withdrawn")
    failed_step, reason = failure_of(saga)
    if step == "correct":
        return await effects.notify(saga, step, "CompletionCorrected", reason)
    if step == "unfinalize":
        return await effects.command(saga, step, domain.UnfinalizeDocuments(
            f"completion failed at {failed_step}: {reason}"[:2000]))
    if step == "record":
        if saga.status == "running":
            skipped = tuple(n for n, o in saga.steps.items() if o.get("status") == "skipped")
            return await effects.command(saga, step, domain.RecordCompletion(skipped))
        return await effects.command(saga, step, domain.RecordCompletion(
            failed_step=failed_step, reason=reason[:2000]))
    raise ValueError(f"no such saga step {step!r}")
