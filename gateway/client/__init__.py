"""A Python client of the gateway's agent API, synchronous and asynchronous.

    from gateway.client import Gateway

    with Gateway("http://127.0.0.1:8888", token) as gateway:
        with gateway.create_session() as session:
            session.files.write("data.csv", "city,temp\\nOslo,4\\n")
            step = session.run("import pandas as pd\\ndf = pd.read_csv('data.csv')\\ndf.temp.mean()",
                               on_stdout=print)
            print(step.status, step.text)

``AsyncGateway`` and ``AsyncSession`` offer the same, awaited. Errors the gateway answers are
raised as ``GatewayError`` subclasses carrying its code and message; a step that fails is not
an error of the client: its ``status`` and ``error`` say what happened. See docs/sdk.md.
"""

from gateway.client._async import AsyncFiles, AsyncGateway, AsyncSession
from gateway.client._sync import Files, Gateway, Session
from gateway.client.errors import (AuthenticationError, ConflictError, GatewayError, InvalidRequestError,
                                   NotFoundError, PayloadTooLargeError, PermissionDeniedError, SessionEndedError,
                                   StateNotSavedError, UnavailableError, WorkspaceFullError)
from gateway.client.models import Execution, ExecutionError, FileInfo, Result, SessionInfo

__all__ = [
    "AsyncFiles", "AsyncGateway", "AsyncSession", "AuthenticationError", "ConflictError", "Execution",
    "ExecutionError", "FileInfo", "Files", "Gateway", "GatewayError", "InvalidRequestError", "NotFoundError",
    "PayloadTooLargeError", "PermissionDeniedError", "Result", "Session", "SessionEndedError", "SessionInfo",
    "StateNotSavedError", "UnavailableError", "WorkspaceFullError",
]
