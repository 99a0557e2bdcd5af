"""Counters the gateway exposes at /metrics in Prometheus' text format."""

from __future__ import annotations

from collections import Counter
from dataclasses import dataclass, field

from gateway.outcomes import FINAL_STATUSES


@dataclass
class Metrics:
    """Process-wide counters; the session manager and the base handler bump them."""

    requests: int = 0
    steps_by_status: Counter[str] = field(default_factory=Counter)
    step_seconds_total: float = 0.0

    def observe_step(self, status: str, duration_ms: float) -> None:
        self.steps_by_status[status] += 1
        self.step_seconds_total += duration_ms / 1000.0

    def render(self, live: int, paused: int) -> str:
        lines = [
            "# HELP agent_gateway_http_requests_total HTTP requests received.",
            "# TYPE agent_gateway_http_requests_total counter",
            f"agent_gateway_http_requests_total {self.requests}",
            "# HELP agent_gateway_steps_total Steps executed, by status.",
            "# TYPE agent_gateway_steps_total counter",
        ]
        for status in FINAL_STATUSES:
            lines.append(f'agent_gateway_steps_total{{status="{status}"}} {self.steps_by_status[status]}')
        lines += [
            "# HELP agent_gateway_step_seconds_total Time spent executing steps.",
            "# TYPE agent_gateway_step_seconds_total counter",
            f"agent_gateway_step_seconds_total {self.step_seconds_total:.6f}",
            "# HELP agent_gateway_sessions Sessions by state.",
            "# TYPE agent_gateway_sessions gauge",
            f'agent_gateway_sessions{{state="live"}} {live}',
            f'agent_gateway_sessions{{state="paused"}} {paused}',
        ]
        return "\n".join(lines) + "\n"
