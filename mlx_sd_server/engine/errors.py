"""The error every layer raises for a request it cannot honour, and how a client's value is shown in one.

`JobError` carries what the HTTP layer needs for OpenAI's error envelope (message, param, code, status).
Messages show a client's value through `shown`, which never echoes more than `ECHO_CHARS`.
"""

from __future__ import annotations

from typing import Any

ECHO_CHARS = 80  # the most of a client's value an error message repeats


class JobError(ValueError):
    """A request field is invalid. Carries what the HTTP layer needs for OpenAI's error envelope."""

    def __init__(self, message: str, param: str | None = None, code: str = "invalid_value", status: int = 400):
        super().__init__(message)
        self.message = message
        self.param = param
        self.code = code
        self.status = status


def shown(value: Any, limit: int = ECHO_CHARS) -> str:
    """A client's value for an error message: its repr, cut to `limit` characters with an ellipsis.
    Arrays and objects are named, not shown; a huge string is never copied whole."""
    if isinstance(value, (str, bytes)):
        text = repr(value[: limit + 1])
        cut = len(value) > limit or len(text) > limit
    elif value is None or isinstance(value, (bool, int, float)):
        try:
            text = repr(value)
        except ValueError:  # an int beyond Python's digit limit for str()
            return "an integer too large to show"
        cut = len(text) > limit
    else:
        return kind_of(value)
    return text[: limit - 1] + "…" if cut else text


def kind_of(value: Any) -> str:
    """What a JSON value is, in JSON's words."""
    if isinstance(value, bool):
        return "a boolean"
    if isinstance(value, (int, float)):
        return "a number"
    if isinstance(value, str):
        return "a string"
    if isinstance(value, (list, tuple)):
        return "an array"
    if isinstance(value, dict):
        return "an object"
    return "null" if value is None else f"a {type(value).__name__}"
