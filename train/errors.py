"""The base of every error caused by bad user input, and the one way a validation problem
becomes one line.

Commands print such an error as one line and exit with code 2; anything else is a bug and
keeps its traceback.
"""

from __future__ import annotations

from typing import Any


class UserError(Exception):
    pass


def validation_problem(exc: Any) -> tuple[str, str]:
    """(dotted location, message) of the first problem of a pydantic ValidationError, e.g.
    ("stages.stage1.steps", "Input should be greater than 0")."""
    err = exc.errors()[0]
    return ".".join(str(x) for x in err["loc"]), str(err["msg"]).removeprefix("Value error, ")
