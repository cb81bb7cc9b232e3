"""One exception type for every mistake a user can make.

The CLI turns a `UserError` into one line on stderr and exit code 2; everything else is a bug and keeps
its traceback. Raise it *before* anything is written, so that bad input never costs data.
"""

EXIT_USER_ERROR = 2  # the exit code of every entry point (`leantune`, `python -m leantune.bench.*`)


class UserError(Exception):
    """A problem with the user's input: the message names what is wrong and how to fix it."""


def name_some(items: list[str], limit: int = 5, sep: str = ", ") -> str:
    """The first `limit` items of a one-line message, then how many more: "a, b and 3 more" (with
    sep="; ": "a; b; and 3 more"), so a refusal names what is wrong without flooding the line."""
    more = len(items) - limit
    return sep.join(items[:limit]) + (f"{sep.rstrip(', ')} and {more} more" if more > 0 else "")
