"""The application processes `ringiflow up` supervises, and how to run one."""

from __future__ import annotations

import importlib
import socket
from dataclasses import dataclass

from infra.settings import Settings


@dataclass(frozen=True)
class Component:
    name: str
    factory: str  # "module:function" taking Settings, returning an ASGI app
    host_setting: str
    port_setting: str
    description: str
    instances_setting: str | None = None  # processes sharing the port (SO_REUSEPORT)

    def instances(self, settings: Settings) -> int:
        return getattr(settings, self.instances_setting) if self.instances_setting else 1

    def address(self, settings: Settings) -> tuple[str, int]:
        return getattr(settings, self.host_setting), getattr(settings, self.port_setting)

    def url(self, settings: Settings) -> str:
        host, port = self.address(settings)
        return f"http://{host}:{port}"


COMPONENTS: dict[str, Component] = {
    c.name: c
    for c in (
        Component("command-api", "commands.app:create_app", "command_api_host",
                  "command_api_port", "command API", "command_api_processes"),
        Component("relay", "relay.app:create_app", "relay_host", "relay_port",
                  "outbox relay"),
        Component("workers", "streams.app:create_app", "workers_host", "workers_port",
                  "projectors and stream processors"),
        Component("query-api", "query_api.app:create_app", "query_api_host",
                  "query_api_port", "query API", "query_api_processes"),
        Component("console", "console.app:create_app", "console_host", "console_port",
                  "operator console"),
    )
}


KEEP_ALIVE_S = 75


def run_component(name: str, settings: Settings) -> None:
    import uvicorn

    from infra import gc_tuning, logsafe, tracing

    logsafe.install()
    tracing.setup(name)
    component = COMPONENTS[name]
    module, function = component.factory.split(":")
    app = getattr(importlib.import_module(module), function)(settings)
    tracing.instrument_app(app)
    host, port = component.address(settings)
    # uvicorn's own handlers redact too: it logs each WebSocket's path, `?token=` and all.
    config = uvicorn.Config(app, host=host, port=port, log_level=settings.log_level.lower(),
                            access_log=False, timeout_graceful_shutdown=10,
                            # Idle keep-alive longer than the clients' and proxies' own
                            # (aiohttp 15 s, load balancers 60 s): a server that closes
                            # first races a client reusing the connection, which then
                            # sees a reset (uvicorn's default is 5 s).
                            timeout_keep_alive=KEEP_ALIVE_S,
                            log_config=logsafe.uvicorn_log_config())
    logsafe.filter_handlers()
    # SO_REUSEPORT lets several processes of one API share its port; the kernel
    # spreads connections over them, and each process stays a plain child.
    # IPPROTO_TCP explicitly: asyncio sets TCP_NODELAY only on sockets that say so,
    # and without it every response waits ~40 ms for a delayed ACK.
    sock = socket.socket(socket.AF_INET6 if ":" in host else socket.AF_INET,
                         socket.SOCK_STREAM, socket.IPPROTO_TCP)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEPORT, 1)
    sock.bind((host, port))
    sock.set_inheritable(True)
    gc_tuning.settle()
    uvicorn.Server(config).run(sockets=[sock])
