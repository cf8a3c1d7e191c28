"""The application processes `ringiflow up` supervises, and how to run one."""

from __future__ import annotations

import importlib
from dataclasses import dataclass

from infra.settings import Settings


@dataclass(frozen=True)
class Component:
    name: str
    factory: str  # "module:function" taking Settings, returning an ASGI app
    host_setting: str
    port_setting: str
    description: str

    def address(self, settings: Settings) -> tuple[str, int]:
        return getattr(settings, self.host_setting), getattr(settings, self.port_setting)

    def url(self, settings: Settings) -> str:
        host, port = self.address(settings)
        return f"http://{host}:{port}"


COMPONENTS: dict[str, Component] = {
    c.name: c
    for c in (
        Component("command-api", "commands.app:create_app", "command_api_host",
                  "command_api_port", "command API"),
        Component("relay", "relay.app:create_app", "relay_host", "relay_port",
                  "outbox relay"),
        Component("workers", "streams.app:create_app", "workers_host", "workers_port",
                  "projectors and stream processors"),
        Component("query-api", "query_api.app:create_app", "query_api_host",
                  "query_api_port", "query API"),
    )
}


def run_component(name: str, settings: Settings) -> None:
    import uvicorn

    component = COMPONENTS[name]
    module, function = component.factory.split(":")
    app = getattr(importlib.import_module(module), function)(settings)
    host, port = component.address(settings)
    uvicorn.run(app, host=host, port=port, log_level=settings.log_level.lower(),
                access_log=False, timeout_graceful_shutdown=10)
