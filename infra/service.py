"""What every RingiFlow process exposes: /healthz (alive), /readyz (its
dependencies reachable) and /metrics (Prometheus)."""

from __future__ import annotations

from fastapi import APIRouter, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from infra.clients import Check, run_checks


def health_router(component: str, checks: dict[str, Check],
                  optional: frozenset[str] = frozenset()) -> APIRouter:
    """`optional` dependencies are reported but do not fail readiness: the service
    degrades without them (e.g. the query API without Redis)."""
    router = APIRouter(tags=["health"])

    @router.get("/healthz", summary="Liveness: the process is up")
    async def healthz() -> dict[str, str]:
        return {"status": "ok", "component": component}

    @router.get("/readyz", summary="Readiness: every dependency is reachable")
    async def readyz() -> JSONResponse:
        results = await run_checks(checks)
        ready = all(v == "ok" for k, v in results.items() if k not in optional)
        degraded = any(v != "ok" for k, v in results.items() if k in optional)
        status = "not_ready" if not ready else "degraded" if degraded else "ready"
        return JSONResponse(
            {"status": status, "component": component, "dependencies": results},
            status_code=200 if ready else 503,
        )

    @router.get("/metrics", summary="Prometheus metrics", include_in_schema=False)
    async def metrics() -> Response:
        return Response(generate_latest(), media_type=CONTENT_TYPE_LATEST)

    return router
