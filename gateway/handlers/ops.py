"""Operations routes: health (no token) and Prometheus metrics."""

from __future__ import annotations

import json

from gateway import __version__
from gateway.api_spec import Operation, openapi_document
from gateway.handlers.base import BaseHandler


class HealthHandler(BaseHandler):
    public = True
    operations = {"get": Operation("Liveness, the version and session counts (no token needed)", "Health",
                                   public=True)}

    async def get(self) -> None:
        self.write_json({"status": "ok", "version": __version__, "sessions": self.gateway.sessions.counts()})


class OpenApiHandler(BaseHandler):
    """The OpenAPI 3.1 document of the agent API, made from the routes' own definitions."""

    public = True
    operations = {"get": Operation("This document: the agent API as OpenAPI 3.1 (no token needed)", "OpenApi",
                                   public=True)}

    async def get(self) -> None:
        from gateway.server import ROUTES

        self.set_header("Content-Type", "application/json")
        self.finish(json.dumps(openapi_document(ROUTES, __version__)))


class MetricsHandler(BaseHandler):
    async def get(self) -> None:
        counts = self.gateway.sessions.counts()
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(self.gateway.metrics.render(counts["live"], counts["paused"]))


routes = [
    (r"/v1/health", HealthHandler),
    (r"/v1/openapi\.json", OpenApiHandler),
    (r"/metrics", MetricsHandler),
]
