"""Agent Kernel Gateway: persistent Jupyter kernel sessions for AI agents, recorded as notebooks."""

__version__ = "0.1.0"
