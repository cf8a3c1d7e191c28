"""One function per command, callable without HTTP (tests, scripts, a console): each
resolves what its command needs from other aggregates (names, a definition's steps),
checks the caller's roles, and runs it through `service.execute`. Refusals are domain
or application errors; `commands.app` maps them to problem+json."""

from __future__ import annotations

from datetime import datetime
from uuid import UUID, uuid4

from commands import domain
from commands.reads import Reads
from commands.service import CommandContext, NotAllowed, Outcome, Writer, execute
from contract import AggregateType, Priority, StepTemplateSnapshot

DIRECTORY_ROLES = {"admin", "service"}


def require_directory_role(ctx: CommandContext, action: str) -> None:
    if not DIRECTORY_ROLES & set(ctx.principal.roles):
        raise NotAllowed(f"{action} needs the 'admin' or 'service' role; ask an administrator")


async def user_names(reads: Reads, ids: set[UUID]) -> dict[UUID, str]:
    return {user_id: user["display_name"] for user_id, user in (await reads.users(ids)).items()}


def unknown_users(ids: set[UUID], field: str) -> domain.UnknownReference:
    listed = ", ".join(sorted(str(i) for i in ids))
    return domain.UnknownReference(
        f"{field}: user(s) {listed} are not registered in your tenant; register them first "
        "(POST /api/v1/commands/users)")


async def _run(writer: Writer, ctx: CommandContext, aggregate_type: AggregateType,
               aggregate_id: UUID, command: domain.Command, created: bool = False) -> Outcome:
    async def build(_reads: Reads) -> domain.Command:
        return command

    return await execute(writer, ctx, aggregate_type, aggregate_id, build, 201 if created else 200)


async def register_user(writer: Writer, ctx: CommandContext, user_id: UUID | None,
                        display_name: str, email: str) -> Outcome:
    require_directory_role(ctx, "registering a user")
    return await _run(writer, ctx, AggregateType.USER, user_id or uuid4(),
                      domain.RegisterUser(display_name, email), created=True)


async def rename_user(writer: Writer, ctx: CommandContext, user_id: UUID,
                      display_name: str) -> Outcome:
    if ctx.principal.user_id != user_id:  # anyone may rename themselves
        require_directory_role(ctx, "renaming another user")
    return await _run(writer, ctx, AggregateType.USER, user_id, domain.RenameUser(display_name))


async def set_notification_preferences(
        writer: Writer, ctx: CommandContext, user_id: UUID, locale: str,
        channels: tuple[str, ...], chat_webhook_url: str | None) -> Outcome:
    if ctx.principal.user_id != user_id:  # anyone may choose for themselves
        require_directory_role(ctx, "setting another user's notification preferences")
    return await _run(writer, ctx, AggregateType.USER, user_id,
                      domain.SetNotificationPreferences(locale, channels, chat_webhook_url))


async def create_definition(writer: Writer, ctx: CommandContext, name: str,
                            steps: list[tuple[str, UUID]], description: str | None) -> Outcome:
    """`steps`: (name, assignee id) in order."""
    require_directory_role(ctx, "creating a definition")

    async def build(reads: Reads) -> domain.Command:
        assignees = {assignee for _, assignee in steps}
        missing = assignees - set(await user_names(reads, assignees))
        if missing:
            raise unknown_users(missing, "steps[].assignee_id")
        return domain.CreateDefinition(
            name, tuple(domain.StepTemplate(n, assignee) for n, assignee in steps), description)

    return await execute(writer, ctx, AggregateType.DEFINITION, uuid4(), build, 201,
                         new=True)


async def create_workflow(writer: Writer, ctx: CommandContext, definition_id: UUID,
                          title: str, description: str | None, priority: Priority | str,
                          due_date: datetime | None,
                          documents: tuple[domain.DocumentInfo, ...]) -> Outcome:
    async def build(reads: Reads) -> domain.Command:
        snapshot, assignees = await reads.definition_with_assignees(definition_id)
        steps: list[StepTemplateSnapshot] = snapshot["steps"] if snapshot else []
        definition = domain.DefinitionState(
            definition_id, version=snapshot["version"] if snapshot else 0,
            name=snapshot["name"] if snapshot else "",
            steps=tuple(domain.StepTemplate(s["name"], UUID(s["assignee_id"])) for s in steps))
        names = {user_id: user["display_name"] for user_id, user in assignees.items()}
        return domain.CreateWorkflow(
            definition_id=definition_id, definition_name=definition.name,
            steps=domain.resolve_steps(definition, names), title=title,
            description=description, priority=priority, due_date=due_date,
            documents=documents)

    # A new id: nothing to load, so the command costs the append, and the lookup
    # unless the process holds the definition and its assignees (ADR 0016).
    return await execute(writer, ctx, AggregateType.WORKFLOW, uuid4(), build, 201, new=True)


async def on_workflow(writer: Writer, ctx: CommandContext, workflow_id: UUID,
                      command: domain.Command) -> Outcome:
    """A workflow command that needs nothing from other aggregates."""
    return await _run(writer, ctx, AggregateType.WORKFLOW, workflow_id, command)


async def delegate_step(writer: Writer, ctx: CommandContext, workflow_id: UUID,
                        step_id: UUID, delegate_to: UUID, comment: str | None) -> Outcome:
    async def build(reads: Reads) -> domain.Command:
        names = await user_names(reads, {delegate_to})
        if delegate_to not in names:
            raise unknown_users({delegate_to}, "delegate_to")
        return domain.DelegateStep(step_id, delegate_to, names[delegate_to], comment)

    return await execute(writer, ctx, AggregateType.WORKFLOW, workflow_id, build)
