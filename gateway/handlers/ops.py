"""Operations routes: health (no token) and Prometheus metrics."""

from __future__ import annotations

from gateway import __version__
from gateway.handlers.base import BaseHandler


class HealthHandler(BaseHandler):
    public = True

    async def get(self) -> None:
        self.write_json({"status": "ok", "version": __version__, "sessions": self.gateway.sessions.counts()})


class MetricsHandler(BaseHandler):
    async def get(self) -> None:
        counts = self.gateway.sessions.counts()
        self.set_header("Content-Type", "text/plain; version=0.0.4; charset=utf-8")
        self.finish(self.gateway.metrics.render(counts["live"], counts["paused"]))


routes = [
    (r"/v1/health", HealthHandler),
    (r"/metrics", MetricsHandler),
]
