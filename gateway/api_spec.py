"""What each route of the agent API takes and answers, declared once: the handlers validate their
bodies and query parameters with these definitions, and ``openapi_document`` turns the same
definitions into the OpenAPI 3.1 document served at ``GET /v1/openapi.json``."""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from typing import Any, Iterable, Mapping

from gateway import states

JSON_TYPES = {str: "string", int: "integer", float: "number", bool: "boolean", dict: "object", list: "array"}
STEP_STATUSES = ("ok", "error", "timeout", "interrupted", "died", "not_run", "running", "lost")


@dataclass(frozen=True)
class Field:
    """A field of a JSON request body."""

    name: str
    types: tuple[type, ...]
    description: str
    required: bool = False
    schema: Mapping[str, Any] = field(default_factory=dict)  # more of its JSON Schema (items, bounds)

    def json_schema(self) -> dict[str, Any]:
        kinds = [JSON_TYPES[t] for t in self.types]
        if "number" in kinds and "integer" in kinds:
            kinds.remove("integer")
        if not self.required:
            kinds.append("null")  # an optional field given as null is as if absent
        return {"type": kinds[0] if len(kinds) == 1 else kinds, "description": self.description, **self.schema}


@dataclass(frozen=True)
class Body:
    """A JSON object body: its fields, all optional unless ``required``; no other field is allowed.
    With no fields, the body must be empty or ``{}``."""

    fields: tuple[Field, ...] = ()

    @property
    def types(self) -> dict[str, tuple[type, ...]]:
        return {f.name: f.types for f in self.fields}

    @property
    def required(self) -> tuple[str, ...]:
        return tuple(f.name for f in self.fields if f.required)

    def json_schema(self) -> dict[str, Any]:
        schema: dict[str, Any] = {"type": "object", "additionalProperties": False,
                                  "properties": {f.name: f.json_schema() for f in self.fields}}
        if self.required:
            schema["required"] = list(self.required)
        return schema


NO_BODY = Body()


@dataclass(frozen=True)
class Param:
    """A query parameter; a whole number when ``minimum`` and ``maximum`` are set."""

    name: str
    description: str
    default: Any = None
    minimum: int | None = None
    maximum: int | None = None
    enum: tuple[str, ...] = ()

    def json_schema(self) -> dict[str, Any]:
        if self.minimum is not None:
            return {"type": "integer", "minimum": self.minimum, "maximum": self.maximum, "default": self.default}
        schema: dict[str, Any] = {"type": "string"}
        if self.enum:
            schema["enum"] = list(self.enum)
        return schema


@dataclass(frozen=True)
class Operation:
    """One method of one route: what it is for, its inputs, and its answer."""

    summary: str
    answer: str | None  # a schema of ``COMPONENTS``, or None for a body that is not JSON
    status: int = 200
    body: Body | None = NO_BODY  # None: the raw body (an upload)
    query: tuple[Param, ...] = ()
    media_type: str = "application/json"
    public: bool = False
    streams: bool = False  # also answers NDJSON lines with Accept: application/x-ndjson


def limit_param(default: int, maximum: int) -> Param:
    return Param("limit", "page size", default=default, minimum=1, maximum=maximum)


CURSOR = Param("cursor", "the `next` value of the previous page")

_TEXT = {"type": "string"}
_NULLABLE_TEXT = {"type": ["string", "null"]}
_OBJECT = {"type": "object"}
_ERROR_DETAIL = {"type": "object", "required": ["name", "value", "traceback"],
                 "properties": {"name": _TEXT, "value": _TEXT, "traceback": _TEXT}}

COMPONENTS: dict[str, dict[str, Any]] = {
    "Error": {"type": "object", "required": ["error"], "additionalProperties": False, "properties": {
        "error": {"type": "object", "required": ["code", "message", "details"], "additionalProperties": False,
                  "properties": {"code": {"type": "string", "pattern": "^[a-z_]+$"}, "message": _TEXT,
                                 "details": _OBJECT}}}},
    "Health": {"type": "object", "required": ["status", "version", "sessions"],
               "properties": {"status": {"const": "ok"}, "version": _TEXT, "sessions": _OBJECT}},
    "Session": {"type": "object", "required": ["id", "kernel_id", "kernel", "state", "owner", "labels",
                                                "created_at", "last_activity", "steps", "parent"],
                "properties": {"id": _TEXT, "kernel_id": _NULLABLE_TEXT, "kernel": _TEXT,
                               "state": {"enum": list(states.STATES)}, "owner": _TEXT,
                               "labels": {"type": "object", "additionalProperties": _TEXT},
                               "created_at": _TEXT, "last_activity": _TEXT, "steps": {"type": "integer"},
                               "parent": {"type": ["object", "null"]}, "isolation": _OBJECT,
                               "snapshot": _OBJECT, "environment": {
                                   "type": "object", "required": ["name", "hash", "python", "packages"],
                                   "properties": {"name": _TEXT, "hash": _TEXT, "python": _TEXT,
                                                  "packages": {"type": "integer"}}}}},
    "SessionList": {"type": "object", "required": ["sessions", "next"], "properties": {
        "sessions": {"type": "array", "items": {"$ref": "#/components/schemas/Session"}}, "next": _NULLABLE_TEXT}},
    "Execution": {"type": "object", "required": ["session_id", "step", "status", "stdout", "stderr", "result",
                                                  "error", "outputs", "truncated"],
                  "properties": {"session_id": _TEXT, "step": {"type": ["integer", "null"]},
                                 "execution_count": {"type": ["integer", "null"]},
                                 "status": {"enum": list(STEP_STATUSES)}, "stdout": _TEXT, "stderr": _TEXT,
                                 "result": _NULLABLE_TEXT, "error": {"oneOf": [_ERROR_DETAIL, {"type": "null"}]},
                                 "outputs": {"type": "array", "items": _OBJECT}, "started_at": _NULLABLE_TEXT,
                                 "finished_at": _NULLABLE_TEXT, "duration_ms": {"type": ["number", "null"]},
                                 "truncated": {"type": "boolean"}}},
    "StepList": {"type": "object", "required": ["steps"], "properties": {
        "steps": {"type": "array", "items": {"$ref": "#/components/schemas/Execution"}}}},
    "EventList": {"type": "object", "required": ["events"], "properties": {
        "events": {"type": "array", "items": {"type": "object", "required": ["action", "at"]}}}},
    "Interrupted": {"type": "object", "required": ["session_id", "interrupted"],
                    "properties": {"session_id": _TEXT, "interrupted": {"type": "boolean"}}},
    "FileList": {"type": "object", "required": ["files", "next"], "properties": {
        "files": {"type": "array", "items": {"type": "object", "required": ["path", "size", "modified"],
                                             "properties": {"path": _TEXT, "size": {"type": "integer"},
                                                            "modified": _TEXT}}},
        "next": _NULLABLE_TEXT}},
    "FileWritten": {"type": "object", "required": ["path", "size", "sha256"],
                    "properties": {"path": _TEXT, "size": {"type": "integer"}, "sha256": _TEXT}},
    "FileDeleted": {"type": "object", "required": ["path", "deleted"],
                    "properties": {"path": _TEXT, "deleted": {"enum": ["file", "directory"]}}},
    "ReplayReport": {"type": "object", "required": ["session_id", "steps"]},
    "Notebook": {"type": "object", "required": ["cells", "metadata", "nbformat", "nbformat_minor"],
                 "properties": {"nbformat": {"const": 4}, "cells": {"type": "array", "items": _OBJECT}}},
    "OpenApi": {"type": "object", "required": ["openapi", "info", "paths"]},
}

_SID = r"(?P<session_id>[A-Za-z0-9_-]{1,64})"
_NAMED_GROUP = re.compile(r"\(\?P<(?P<name>\w+)>(?P<pattern>[^()]*)\)")
_ERRORS_OF_EVERY_CALL = {"401": "no token, or one the gateway does not know",
                         "default": "an error: the envelope with its code (docs/api.md, Errors)"}


def path_template(pattern: str) -> tuple[str, dict[str, str]]:
    """``/v1/sessions/(?P<session_id>...)`` as ``/v1/sessions/{session_id}``, with each path
    parameter's pattern."""
    parameters: dict[str, str] = {}

    def name(match: re.Match[str]) -> str:
        parameters[match["name"]] = match["pattern"]
        return "{" + match["name"] + "}"

    return _NAMED_GROUP.sub(name, pattern).replace("\\.", "."), parameters


def operation_object(method: str, handler: type, path_parameters: Mapping[str, str]) -> dict[str, Any]:
    operation: Operation = handler.operations[method]  # type: ignore[attr-defined]
    parameters: list[dict[str, Any]] = [
        {"name": name, "in": "path", "required": True,
         "schema": {"type": "string", "pattern": f"^{pattern}$" if name != "path" else "^.+$"}}
        for name, pattern in path_parameters.items()]
    parameters += [{"name": p.name, "in": "query", "required": False, "description": p.description,
                    "schema": p.json_schema()} for p in operation.query]
    answer: dict[str, Any] = {"description": operation.summary}
    if operation.answer is not None:
        content = {operation.media_type: {"schema": {"$ref": f"#/components/schemas/{operation.answer}"}}}
        if operation.streams:
            content["application/x-ndjson"] = {"schema": {"type": "string"}}
        answer["content"] = content
    else:
        answer["content"] = {operation.media_type: {"schema": {"type": "string"}}}
    responses: dict[str, Any] = {str(operation.status): answer}
    for status, description in _ERRORS_OF_EVERY_CALL.items():
        if status == "401" and operation.public:
            continue
        responses[status] = {"description": description,
                             "content": {"application/json": {"schema": {"$ref": "#/components/schemas/Error"}}}}
    described: dict[str, Any] = {"summary": operation.summary,
                                 "operationId": f"{method}_{handler.__name__.removesuffix('Handler')}",
                                 "parameters": parameters, "responses": responses}
    if operation.public:
        described["security"] = []
    if operation.body is None:
        described["requestBody"] = {"required": True, "content": {"application/octet-stream": {
            "schema": {"type": "string", "format": "binary"}}}}
    elif method in ("post", "put"):
        described["requestBody"] = {"required": bool(operation.body.required), "content": {
            "application/json": {"schema": operation.body.json_schema()}}}
    return described


def openapi_document(routes: Iterable[tuple[str, type]], version: str) -> dict[str, Any]:
    """The OpenAPI 3.1 document of the agent API: every route under ``/v1``."""
    paths: dict[str, Any] = {}
    for pattern, handler in routes:
        if not pattern.startswith("/v1"):
            continue
        template, parameters = path_template(pattern)
        operations = getattr(handler, "operations", {})
        served = [m for m in ("get", "post", "put", "delete") if m in handler.__dict__ or m in operations]
        missing = [m for m in served if m not in operations]
        if missing:
            raise ValueError(f"{handler.__name__} serves {missing} without an Operation (gateway.api_spec)")
        paths[template] = {method: operation_object(method, handler, parameters) for method in served}
    return {
        "openapi": "3.1.0",
        "info": {"title": "Agent Kernel Gateway: the agent API", "version": version,
                 "description": "Persistent, recorded Jupyter kernel sessions for AI agents (docs/api.md)."},
        "paths": paths,
        "components": {"schemas": COMPONENTS, "securitySchemes": {
            "bearer": {"type": "http", "scheme": "bearer", "description": "a gateway token or a JWT"},
            "query": {"type": "apiKey", "in": "query", "name": "token"}}},
        "security": [{"bearer": []}, {"query": []}],
    }
