"""The command API's OpenAPI document, beyond what FastAPI derives from the routes:
the errors each command can answer, the Idempotency-Key and X-Correlation-ID headers,
the consistency token and headers of a success, and links from each command to the
commands its result enables (CreateDefinition -> CreateWorkflow -> SubmitWorkflow ...),
which clients and stateful fuzzers (schemathesis) follow."""

from __future__ import annotations

from fastapi import FastAPI

from infra import openapi
from infra.openapi import Operation, Spec

# Every command reads a JSON body, authenticates, validates and writes PostgreSQL.
COMMON_ERRORS = {400, 401, 413, 422, 503}
# Commands on an existing aggregate (a path id) add 404; see commands.domain for each rule.
ERRORS: dict[str, set[int]] = {
    "RegisterUser": {403, 409},
    "RenameUser": {403, 404, 409},
    "CreateDefinition": {403, 409},
    "CreateWorkflow": {409},
}
WORKFLOW_ERRORS = {403, 404, 409}
DESCRIPTIONS: dict[str, dict[int, str]] = {
    "RegisterUser": {403: "Registering users needs the `admin` or `service` role.",
                     409: "A user with this `user_id` already exists."},
    "RenameUser": {403: "Renaming another user needs the `admin` or `service` role.",
                   404: "No such user in the caller's tenant."},
    "CreateDefinition": {403: "Creating definitions needs the `admin` or `service` role.",
                         422: "Invalid body, or a step's assignee is not a registered user "
                              "(`unknown_reference`)."},
    "CreateWorkflow": {422: "Invalid body, or the definition (or one of its assignees) "
                            "does not exist in the caller's tenant (`unknown_reference`)."},
}

IDEMPOTENCY_DESCRIPTION = (
    "Makes a retry safe. 1-255 visible ASCII characters (0x21-0x7E, no spaces), chosen "
    "by the client, unique per tenant; a UUID is a good choice. The first successful "
    "response to a key is stored: a retry with the same key by the same caller, for the "
    "same method, path and body (`expected_version` aside), appends nothing and replays "
    "that response - the same status and body, including its `consistency_token` - with "
    "`Idempotent-Replayed: true`. The same key with a different request (or caller) is "
    "refused with 422 `idempotency_key_reused`; a malformed key with 422 `invalid_header`. "
    "A command that failed stores nothing, so its key can be used again.")
CORRELATION_DESCRIPTION = (
    "A UUID tying this command to others of one business transaction; recorded in the "
    "events' metadata and echoed in the response. Generated when absent or empty (a W3C "
    "`traceparent` header is honoured the same way for the trace id).")
SUCCESS_HEADERS = {
    "X-Correlation-ID": {"description": "The command's correlation id.", "required": True,
                         "schema": {"type": "string", "format": "uuid"}},
    "Idempotent-Replayed": {"description": "`true` when this is the stored response to an "
                            "earlier request with the same Idempotency-Key.",
                            "schema": {"type": "string", "enum": ["true"]}},
}
WORKFLOW_ID = {"workflow_id": "$response.body#/aggregate_id"}
AT_VERSION = {"expected_version": "$response.body#/version"}
# (source operation, status, link name, target operation, link object without operationId)
LINKS: list[tuple[str, str, str, str, Spec]] = [
    ("RegisterUser", "201", "RenameUser", "RenameUser",
     {"parameters": {"user_id": "$response.body#/aggregate_id"}, "requestBody": AT_VERSION,
      "description": "Rename the user just registered."}),
    ("RegisterUser", "201", "CreateDefinition", "CreateDefinition",
     {"requestBody": {"name": "稟議", "expected_version": 0, "steps": [
         {"name": "承認", "assignee_id": "$response.body#/aggregate_id"}]},
      "description": "A definition whose one step the registered user approves."}),
    ("CreateDefinition", "201", "CreateWorkflow", "CreateWorkflow",
     {"requestBody": {"definition_id": "$response.body#/aggregate_id", "expected_version": 0},
      "description": "Start a workflow from the definition just created."}),
    *[(source, status, target, target,
       {"parameters": WORKFLOW_ID, "requestBody": AT_VERSION,
        "description": f"{target} on the workflow this command wrote."})
      for source, status in (("CreateWorkflow", "201"), ("SubmitWorkflow", "200"),
                             ("AddComment", "200"), ("AttachDocument", "200"))
      for target in ("SubmitWorkflow", "AddComment", "AttachDocument", "CancelWorkflow")],
]


# What commands.schemas accepts as text, as patterns a client (or a fuzzer) can generate
# from: no control characters (free text keeps tab and line breaks) and something visible
# (not only spaces or zero-width characters).
CONTROL = r"\x00-\x1f\x7f-\x9f"
CONTROL_MULTILINE = r"\x00-\x08\x0b\x0c\x0e-\x1f\x7f-\x9f"
INVISIBLE = r"\s\u00ad\u061c\u180e\u200b-\u200f\u202a-\u202e\u2060-\u2064\u2066-\u206f\ufeff"


def visible_text(control: str) -> str:
    return f"^[^{control}]*[^{control}{INVISIBLE}][^{control}]*$"


def without_control(pattern: str) -> str:
    """A field's own pattern (email, URL, content type), control characters excluded."""
    return (pattern.replace(r"[^@\s]", rf"[^@\s{CONTROL}]").replace(r"\S", rf"[^\s{CONTROL}]")
            .replace("(;.*)", rf"(;[^{CONTROL}]*)"))


def document_text(spec: Spec) -> None:
    from commands.domain import MAX_TEXT_LENGTH

    for name, schema in spec["components"]["schemas"].items():
        if not name.endswith("Body"):
            continue
        for field in schema.get("properties", {}).values():
            for variant in field.get("anyOf", [field]):
                if variant.get("type") != "string" or "format" in variant or "enum" in variant or \
                        variant.get("pattern", "").startswith("^[0-9a-fA-F]"):
                    continue
                if "pattern" in variant:
                    variant["pattern"] = without_control(variant["pattern"])
                else:
                    multiline = variant.get("maxLength") == MAX_TEXT_LENGTH
                    variant["pattern"] = visible_text(CONTROL_MULTILINE if multiline
                                                      else CONTROL)


def customize(spec: Spec) -> None:
    from commands.app import IDEMPOTENCY_KEY  # the route module imports this one

    idempotency = openapi.header("Idempotency-Key", IDEMPOTENCY_DESCRIPTION, {
        "type": "string", "minLength": 1, "maxLength": 255,
        "pattern": IDEMPOTENCY_KEY.pattern})
    correlation = openapi.header("X-Correlation-ID", CORRELATION_DESCRIPTION, {"anyOf": [
        {"type": "string", "format": "uuid"}, {"type": "string", "maxLength": 0}]})
    by_id: dict[str, Operation] = {}
    for path, _method, operation in openapi.operations(spec):
        if not path.startswith("/api/v1/commands/"):
            continue
        name = operation.get("summary") or operation["operationId"]
        operation["operationId"] = name
        by_id[name] = operation
        openapi.set_parameter(operation, idempotency)
        openapi.set_parameter(operation, correlation)
        errors = ERRORS.get(name, WORKFLOW_ERRORS)
        openapi.document_errors(operation, COMMON_ERRORS | errors, DESCRIPTIONS.get(name))
        for status in ("200", "201"):
            if status in operation["responses"]:
                operation["responses"][status]["headers"] = SUCCESS_HEADERS
    for source, status, name, target, link in LINKS:
        if source in by_id and target in by_id:
            response = by_id[source]["responses"][status]
            response.setdefault("links", {})[name] = {"operationId": target, **link}

    document_text(spec)
    accepted = spec["components"]["schemas"]["CommandAccepted"]["properties"]
    accepted["aggregate_type"] |= {"enum": ["user", "definition", "workflow"]}
    accepted["version"] |= {"minimum": 1}
    accepted["consistency_token"] |= {
        **openapi.CONSISTENCY_TOKEN_SCHEMA,
        "description": "Send it to the query API as `X-Consistency-Token` (or `?after=`) "
        "to read your own write: the query waits until its read model applied this "
        "version. " + openapi.CONSISTENCY_TOKEN_FORMAT}


def install(app: FastAPI) -> None:
    openapi.install(app, customize)
