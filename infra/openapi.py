"""What both APIs' OpenAPI documents share, and their docs pages.

FastAPI derives each document from the routes; `install` post-processes it, once,
so that it says what the API really does:

- every error a route can answer is documented as RFC 9457 `application/problem+json`
  with the `Problem` schema (the body `infra.problems.Problem.body` builds);
- credentials are a security scheme (HTTP bearer JWT, or an `X-API-Key`) applied to the
  routes that authenticate, rather than two free-text header parameters: Swagger UI
  shows its Authorize button and sends the token with every request it tries;
- each API adds its own headers, response schemas and links (`customize`).

`/docs` (Swagger UI) and `/redoc` are served from assets installed with the package
(`fastapi-offline` ships the Swagger UI 5 and ReDoc bundles), never from a CDN, so
they work offline."""

from __future__ import annotations

import json
from collections.abc import Callable, Iterator
from pathlib import Path
from typing import Any

import fastapi_offline
from fastapi import FastAPI, Request
from fastapi.openapi.docs import (
    get_redoc_html,
    get_swagger_ui_html,
    get_swagger_ui_oauth2_redirect_html,
)
from fastapi.responses import HTMLResponse
from fastapi.staticfiles import StaticFiles

from contract import ConsistencyToken
from infra.problems import PROBLEM_JSON, TYPE_BASE

Spec = dict[str, Any]
Operation = dict[str, Any]

ASSETS_DIR = Path(fastapi_offline.__file__).parent / "static"
ASSETS_URL = "/docs/assets"
SWAGGER_JS = "swagger-ui-bundle.js"
SWAGGER_CSS = "swagger-ui.css"
REDOC_JS = "redoc.standalone.js"
FAVICON = "favicon.png"

BEARER = "bearerAuth"
API_KEY = "apiKeyAuth"
# The credential headers principal_dependency reads: replaced by the security schemes.
CREDENTIAL_HEADERS = {"authorization", "x-api-key"}
SECURITY = [{BEARER: []}, {API_KEY: []}]

# A versioned prefix (`ct2.`; `ct1.` is still read) and the unpadded base64url of a
# small JSON array (contract.ConsistencyToken).
CONSISTENCY_TOKEN_PATTERN = r"^ct[0-9]+\.[A-Za-z0-9_-]+$"
CONSISTENCY_TOKEN_MAX_LENGTH = ConsistencyToken.MAX_LENGTH
CONSISTENCY_TOKEN_FORMAT = (
    "An opaque consistency token, exactly as a command response returned it in "
    "`consistency_token`: a version prefix such as `ct2.` followed by unpadded base64url "
    f"(pattern `{CONSISTENCY_TOKEN_PATTERN}`, at most {CONSISTENCY_TOKEN_MAX_LENGTH} "
    "characters). It names the aggregate and version the command wrote; do not build or "
    "edit one.")
CONSISTENCY_TOKEN_SCHEMA: Spec = {"type": "string", "pattern": CONSISTENCY_TOKEN_PATTERN,
                                  "maxLength": CONSISTENCY_TOKEN_MAX_LENGTH}
# As a request parameter an empty value is the same as none (query_api.consistency).
CONSISTENCY_TOKEN_PARAMETER: Spec = {
    "type": "string", "maxLength": CONSISTENCY_TOKEN_MAX_LENGTH,
    "pattern": "^(?:" + CONSISTENCY_TOKEN_PATTERN.removeprefix("^").removesuffix("$") + ")?$"}

ERROR_DESCRIPTIONS = {
    400: "The request body could not be read (e.g. it is not valid UTF-8).",
    401: "Missing, malformed, expired or forged credentials: send "
         "`Authorization: Bearer <JWT>` (or `X-API-Key`). Answered with "
         "`WWW-Authenticate: Bearer`.",
    403: "Authenticated, but not allowed: the caller lacks the role, or is not the "
         "initiator or assignee the command needs.",
    404: "No such aggregate in the caller's tenant.",
    409: "Conflict: the aggregate is not at `expected_version` or another command changed "
         "it first (`current_version` says where it is), it already exists, or its state "
         "does not allow the command.",
    413: "The request body is larger than the server accepts.",
    429: "Too many requests of this kind at once for the caller (or its tenant); retry "
         "after `Retry-After` seconds.",
    422: "A field, parameter or header is invalid; `detail` and `errors` name each one "
         "(`code` says which rule failed).",
    503: "A store the route needs is unavailable; retry after `Retry-After` seconds.",
}
# What a route itself says about these is more precise than the generic description.
ROUTE_SPECIFIC = (404, 503)
ERROR_HEADERS = {
    401: {"WWW-Authenticate": {"description": "`Bearer realm=\"ringiflow\"`",
                               "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "Seconds to wait before retrying.",
                          "schema": {"type": "string", "pattern": r"^\d+$"}}},
    503: {"Retry-After": {"description": "Seconds to wait before retrying.",
                          "schema": {"type": "string", "pattern": r"^\d+$"}}},
}

PROBLEM_SCHEMA: Spec = {
    "title": "Problem",
    "type": "object",
    "description": "RFC 9457 problem details: every error either API returns.",
    "required": ["type", "title", "status", "detail", "instance", "code"],
    "properties": {
        "type": {"type": "string", "description": f"`{TYPE_BASE}<code>`"},
        "title": {"type": "string", "description": "Short summary of the problem kind."},
        "status": {"type": "integer", "minimum": 400, "maximum": 599,
                   "description": "The HTTP status."},
        "detail": {"type": "string", "description": "What failed and how to fix it."},
        "instance": {"type": "string", "description": "The request path."},
        "code": {"type": "string", "description": "Machine-readable problem code, e.g. "
                 "`validation_error`, `version_conflict`, `unauthenticated`."},
        "errors": {"type": "array", "items": {"$ref": "#/components/schemas/FieldError"},
                   "description": "With `validation_error`: one entry per invalid field."},
        "current_version": {"type": "integer", "minimum": 0,
                            "description": "With `version_conflict`: the aggregate's "
                            "current version."},
    },
    "additionalProperties": True,
}
FIELD_ERROR_SCHEMA: Spec = {
    "title": "FieldError",
    "type": "object",
    "required": ["field", "in", "message"],
    "properties": {
        "field": {"type": "string", "description": "e.g. `steps[0].name`, `due_before`"},
        "in": {"type": "string", "description": "body, query, path or header"},
        "message": {"type": "string"},
        "type": {"type": ["string", "null"], "description": "The validation rule."},
    },
    "additionalProperties": True,
}


def problem_response(status: int, description: str | None = None) -> Spec:
    response: Spec = {
        "description": description or ERROR_DESCRIPTIONS[status],
        "content": {PROBLEM_JSON: {"schema": {"$ref": "#/components/schemas/Problem"}}},
    }
    if status in ERROR_HEADERS:
        response["headers"] = ERROR_HEADERS[status]
    return response


def document_errors(operation: Operation, statuses: set[int],
                    descriptions: dict[int, str] | None = None) -> None:
    """Document `statuses` as problem+json, replacing FastAPI's own 422 (a JSON shape the
    API never sends) and the description-only entries the routers declare; a specific
    description a route gave is kept unless `descriptions` names a better one."""
    responses = operation.setdefault("responses", {})
    for status in sorted(statuses):
        declared = responses.get(str(status), {}).get("description")
        description = (descriptions or {}).get(status) or \
            (declared if status in ROUTE_SPECIFIC else None)
        responses[str(status)] = problem_response(status, description)


def operations(spec: Spec) -> Iterator[tuple[str, str, Operation]]:
    for path, item in spec.get("paths", {}).items():
        for method, operation in item.items():
            if method in ("get", "put", "post", "delete", "patch", "head", "options"):
                yield path, method, operation


def header(name: str, description: str, schema: Spec, *, required: bool = False) -> Spec:
    return {"name": name, "in": "header", "required": required, "description": description,
            "schema": schema}


def set_parameter(operation: Operation, parameter: Spec) -> None:
    """Replace the parameter of that name and place, or add it."""
    params = operation.setdefault("parameters", [])
    for i, existing in enumerate(params):
        if existing["in"] == parameter["in"] and \
                existing["name"].lower() == parameter["name"].lower():
            params[i] = parameter
            return
    params.append(parameter)


def apply_security(spec: Spec) -> None:
    components = spec.setdefault("components", {})
    components.setdefault("securitySchemes", {}).update({
        BEARER: {"type": "http", "scheme": "bearer", "bearerFormat": "JWT",
                 "description": "A JWT with `sub` (user id) and `tenant_id`; for a "
                 "development system mint one with `./dev token --tenant <uuid> "
                 "--user <uuid>`."},
        API_KEY: {"type": "apiKey", "in": "header", "name": "X-API-Key",
                  "description": "A service credential configured in RINGIFLOW_API_KEYS."},
    })
    for _path, _method, operation in operations(spec):
        params = operation.get("parameters", [])
        credentials = [p for p in params
                       if p["in"] == "header" and p["name"].lower() in CREDENTIAL_HEADERS]
        if credentials or operation.get("security"):
            operation["parameters"] = [p for p in params if p not in credentials]
            if not operation["parameters"]:
                del operation["parameters"]
            operation["security"] = SECURITY
            document_errors(operation, {401})


READINESS_SCHEMA: Spec = {
    "title": "Readiness", "type": "object", "required": ["status", "component", "dependencies"],
    "properties": {
        "status": {"type": "string", "enum": ["ready", "degraded", "not_ready"]},
        "component": {"type": "string"},
        "dependencies": {"type": "object", "additionalProperties": {"type": "string"},
                         "description": "Each dependency: `ok` or what is wrong."},
    },
}


def document_health(spec: Spec) -> None:
    """/healthz and /readyz (infra.service): plain JSON, 503 when not ready."""
    paths = spec.get("paths", {})
    if (healthz := paths.get("/healthz", {}).get("get")) is not None:
        healthz["operationId"] = "Healthz"
    if (readyz := paths.get("/readyz", {}).get("get")) is not None:
        readyz["operationId"] = "Readyz"
        body = {"application/json": {"schema": READINESS_SCHEMA}}
        readyz["responses"] = {
            "200": {"description": "Ready (or degraded: an optional dependency is down).",
                    "content": body},
            "503": {"description": "Not ready: a required dependency is unreachable.",
                    "content": body}}


def drop_unused_schemas(spec: Spec) -> None:
    """FastAPI's HTTPValidationError / ValidationError, once nothing refers to them."""
    schemas = spec.get("components", {}).get("schemas", {})
    for name in ("HTTPValidationError", "ValidationError"):  # the first refers to the second
        rest = json.dumps({"paths": spec.get("paths", {}),
                           "schemas": {k: v for k, v in schemas.items() if k != name}})
        if f'"#/components/schemas/{name}"' not in rest:
            schemas.pop(name, None)


def install(app: FastAPI, customize: Callable[[Spec], None] | None = None) -> None:
    """Serve docs from the package and post-process the OpenAPI document."""
    build = app.openapi

    def openapi() -> Spec:
        if app.openapi_schema is None:
            spec = build()
            components = spec.setdefault("components", {}).setdefault("schemas", {})
            components["Problem"] = PROBLEM_SCHEMA
            components["FieldError"] = FIELD_ERROR_SCHEMA
            apply_security(spec)
            document_health(spec)
            if customize is not None:
                customize(spec)
            drop_unused_schemas(spec)
            for _path, _method, operation in operations(spec):
                responses = operation.get("responses", {})
                # Errors a router declared with a description only are problem+json too.
                document_errors(operation, {int(s) for s, r in responses.items()
                                            if s.isdigit() and int(s) >= 400
                                            and "content" not in r and int(s) in
                                            ERROR_DESCRIPTIONS})
                operation["responses"] = dict(sorted(responses.items()))
            app.openapi_schema = spec
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
    install_docs(app)


def install_docs(app: FastAPI) -> None:
    """Replace FastAPI's CDN-loading /docs and /redoc with pages whose every asset is
    served by this process (from the installed fastapi-offline package)."""
    docs_url, redoc_url, openapi_url = app.docs_url, app.redoc_url, app.openapi_url
    if openapi_url is None:
        return
    app.router.routes[:] = [r for r in app.router.routes
                            if getattr(r, "path", None) not in {docs_url, redoc_url}]
    app.mount(ASSETS_URL, StaticFiles(directory=ASSETS_DIR), name="docs-assets")
    redirect_url = app.swagger_ui_oauth2_redirect_url

    if docs_url:
        @app.get(docs_url, include_in_schema=False)
        async def swagger_ui(request: Request) -> HTMLResponse:
            root = request.scope.get("root_path", "")
            return get_swagger_ui_html(
                openapi_url=root + openapi_url, title=f"{app.title} - Swagger UI",
                swagger_js_url=f"{root}{ASSETS_URL}/{SWAGGER_JS}",
                swagger_css_url=f"{root}{ASSETS_URL}/{SWAGGER_CSS}",
                swagger_favicon_url=f"{root}{ASSETS_URL}/{FAVICON}",
                oauth2_redirect_url=root + redirect_url if redirect_url else None,
                # No validator badge: it would be fetched from validator.swagger.io.
                swagger_ui_parameters={"persistAuthorization": True, "validatorUrl": None,
                                       "displayRequestDuration": True,
                                       **(app.swagger_ui_parameters or {})})

        if redirect_url and not any(getattr(r, "path", None) == redirect_url
                                    for r in app.router.routes):
            @app.get(redirect_url, include_in_schema=False)
            async def swagger_ui_redirect() -> HTMLResponse:
                return get_swagger_ui_oauth2_redirect_html()

    if redoc_url:
        @app.get(redoc_url, include_in_schema=False)
        async def redoc(request: Request) -> HTMLResponse:
            root = request.scope.get("root_path", "")
            return get_redoc_html(
                openapi_url=root + openapi_url, title=f"{app.title} - ReDoc",
                redoc_js_url=f"{root}{ASSETS_URL}/{REDOC_JS}",
                redoc_favicon_url=f"{root}{ASSETS_URL}/{FAVICON}", with_google_fonts=False)
