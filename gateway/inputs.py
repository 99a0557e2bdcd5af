"""Checks on what callers send, before anything is created or changed.

The base handler applies the JSON and text rules to every request body, query parameter,
path argument and form field; the field rules (labels here, env and kernel names in
``gateway.kernels``) are applied where those fields are taken. Each check raises
``InvalidRequest`` naming the bad field.
"""

from __future__ import annotations

import itertools
import json
import math
import re
from typing import Any

from gateway.errors import InvalidRequest

JSON_DEPTH_MAX = 64  # arrays and objects nested deeper than this are refused unparsed
JSON_INTEGER_DIGITS_MAX = 64  # so that every accepted number converts to a float
LABELS_MAX = 64
LABEL_KEY_MAX = 128
LABEL_VALUE_MAX = 1024
STDIN_REPLIES_MAX = 1000  # answers to input() one execute request may carry
STDIN_REPLY_MAX = 65536  # characters of one answer

JSON_STRING = re.compile(rb'"[^"\\]*(?:\\.[^"\\]*)*"', re.DOTALL)
BRACKET_STEPS = bytes.maketrans(b"[{]}", b"\x01\x01\xff\xff")  # +1 and -1 as signed bytes
NOT_BRACKETS = bytes(set(range(256)) - set(b"[]{}"))


def decoded(raw: bytes) -> str:
    """Request bytes as text; bytes that are not UTF-8 become lone surrogates, which ``is_text``
    refuses (so a query or a path is held to the same rule as JSON)."""
    return raw.decode("utf-8", "surrogateescape")


def is_text(value: str) -> bool:
    """Whether ``value`` is Unicode text: no lone surrogate, so it encodes as UTF-8."""
    try:
        value.encode("utf-8")
    except UnicodeEncodeError:
        return False
    return True


def printable(value: str) -> str:
    """``value`` with lone surrogates written as ``\\udXXX``, safe to put in a message."""
    return value.encode("utf-8", "backslashreplace").decode("utf-8")


def bad_text_path(value: Any, path: str = "") -> str | None:
    """Where, in parsed JSON, the first key or string that is not Unicode text is (``labels.k``,
    ``env.A``, ``items[2]``); None when everything is text."""
    if isinstance(value, str):
        return None if is_text(value) else path or "(the body)"
    if isinstance(value, dict):
        for key, item in value.items():
            where = f"{path}.{printable(key)}" if path else printable(key)
            if not is_text(key):
                return where
            found = bad_text_path(item, where)
            if found is not None:
                return found
    elif isinstance(value, list):
        for index, item in enumerate(value):
            found = bad_text_path(item, f"{path}[{index}]")
            if found is not None:
                return found
    return None


def check_text(value: Any, field: str = "") -> None:
    """Refuse parsed JSON, or the string of one ``field``, if any key or string in it holds a
    lone surrogate: such text cannot be stored, logged, shown or sent to a kernel."""
    path = bad_text_path(value, field)
    if path is not None:
        top = re.split(r"[.\[]", path, maxsplit=1)[0]
        raise InvalidRequest(f"The field '{path}' contains a lone surrogate, which is not Unicode text; send "
                             "the text as UTF-8 (or as \\u escapes of whole characters).", code="invalid_field",
                             details={"field": top, "path": path})


def check_arguments(arguments: dict[str, list[bytes]], *, code: str, noun: str) -> None:
    """Refuse request arguments (tornado's percent-decoded ``name -> [raw value]``) whose name
    or a value is not UTF-8 text. ``noun`` says what they are in the message."""
    for name, values in arguments.items():
        raw_name = name.encode("latin-1", "replace")  # tornado reads query names as latin-1
        if not all(is_text(decoded(raw)) for raw in (raw_name, *values)):
            shown = printable(decoded(raw_name))
            key = "parameter" if code == "invalid_query" else "field"
            raise InvalidRequest(f"The {noun} '{shown}' is not UTF-8 text once percent-decoded (it has bytes "
                                 "that are not UTF-8, such as an encoded lone surrogate).", code=code,
                                 details={key: shown})


def json_depth(raw: bytes) -> int:
    """How deeply arrays and objects nest in JSON text, found by a linear scan that skips
    strings, without parsing (Python's parser recurses, and fails deep inside)."""
    steps = JSON_STRING.sub(b"", raw).translate(BRACKET_STEPS, NOT_BRACKETS)
    return max(itertools.accumulate(memoryview(steps).cast("b")), default=0)


def parse_json(raw: bytes) -> Any:
    """A request body's (or a websocket frame's) JSON: at most ``JSON_DEPTH_MAX`` deep, numbers
    that fit a float, all text Unicode. Raises ``InvalidRequest``: ``invalid_json``, or
    ``invalid_field`` naming where a lone surrogate is."""
    depth = json_depth(raw) if raw.count(b"[") + raw.count(b"{") > JSON_DEPTH_MAX else 0
    if depth > JSON_DEPTH_MAX:
        raise InvalidRequest(f"The request body nests arrays and objects {depth} levels deep; the limit is "
                             f"{JSON_DEPTH_MAX}.", code="invalid_json", details={"depth_limit": JSON_DEPTH_MAX})
    try:
        data = json.loads(raw.decode("utf-8-sig"), parse_constant=_reject_constant, parse_int=_bounded_int,
                          parse_float=_finite_float)
    except ValueError as exc:  # UnicodeDecodeError included: JSON between systems is UTF-8 (RFC 8259)
        raise InvalidRequest(f"The request body is not valid JSON: {exc}.", code="invalid_json") from None
    check_text(data)
    return data


def validate_labels(labels: Any) -> dict[str, str]:
    """A caller's labels: at most ``LABELS_MAX``, string keys and values within their lengths.
    Called by the handlers that take labels from a caller."""
    if labels is None:
        return {}
    if not isinstance(labels, dict) or not all(isinstance(value, str) for value in labels.values()):
        raise InvalidRequest("'labels' must be an object of string keys to string values.", code="invalid_field",
                             details={"field": "labels"})
    if len(labels) > LABELS_MAX:
        raise InvalidRequest(f"A session takes at most {LABELS_MAX} labels; {len(labels)} were sent.",
                             code="invalid_field", details={"field": "labels", "limit": LABELS_MAX})
    for key, value in labels.items():
        if len(key) > LABEL_KEY_MAX or len(value) > LABEL_VALUE_MAX:
            raise InvalidRequest(f"Label keys are limited to {LABEL_KEY_MAX} characters and values to "
                                 f"{LABEL_VALUE_MAX}; the label '{key[:40]}' is longer.", code="invalid_field",
                                 details={"field": "labels", "key_limit": LABEL_KEY_MAX,
                                          "value_limit": LABEL_VALUE_MAX})
    return dict(labels)


def validate_stdin(stdin: Any) -> list[str] | None:
    """The answers an execute request gives to its step's input() calls (None: no stdin)."""
    if stdin is None:
        return None
    if not isinstance(stdin, list) or not all(isinstance(value, str) for value in stdin):
        raise InvalidRequest("'stdin' must be an array of strings: the answers to the step's input() calls, in "
                             "order.", code="invalid_field", details={"field": "stdin"})
    if len(stdin) > STDIN_REPLIES_MAX or any(len(value) > STDIN_REPLY_MAX for value in stdin):
        raise InvalidRequest(f"'stdin' takes at most {STDIN_REPLIES_MAX} answers of up to {STDIN_REPLY_MAX} "
                             "characters each.", code="invalid_field",
                             details={"field": "stdin", "limit": STDIN_REPLIES_MAX, "value_limit": STDIN_REPLY_MAX})
    return list(stdin)


def _reject_constant(name: str) -> Any:
    raise ValueError(f"{name} is not a JSON number")


def _bounded_int(digits: str) -> int:
    if len(digits.lstrip("-")) > JSON_INTEGER_DIGITS_MAX:
        raise ValueError(f"integers are limited to {JSON_INTEGER_DIGITS_MAX} digits")
    return int(digits)


def _finite_float(text: str) -> float:
    value = float(text)
    if not math.isfinite(value):
        raise ValueError(f"the number {text[:40]} is too large")
    return value
