"""Numbers in configs are what they look like: no bool-as-int, no quoted numbers, no inf/NaN.

Shared by every pydantic model a user fills in (run config, method configs) through `check_number`,
called from a `field_validator("*", mode="before")`.
"""

from __future__ import annotations

import math
import types
import typing
from typing import Any, get_args


def _scalar_types(annotation: Any) -> set[type]:
    """The plain types an annotation admits: `int | None` -> {int, NoneType}; anything else -> object."""
    if isinstance(annotation, type):
        return {annotation}
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return set().union(*(_scalar_types(a) for a in get_args(annotation)))
    if typing.get_origin(annotation) is typing.Annotated:
        return _scalar_types(get_args(annotation)[0])
    if typing.get_origin(annotation) is typing.Literal and annotation is not None:
        return set()  # its words are checked by pydantic (`float | Literal["auto"]` stays numeric)
    return {object}


def _literal_words(annotation: Any) -> set[str]:
    """The text values a `... | Literal["auto"]` annotation admits besides its numbers."""
    if typing.get_origin(annotation) is typing.Literal:
        return {a for a in get_args(annotation) if isinstance(a, str)}
    if typing.get_origin(annotation) in (typing.Union, types.UnionType):
        return set().union(*(_literal_words(a) for a in get_args(annotation)))
    return set()


def check_number(value: Any, annotation: Any) -> Any:
    """No silent coercion: `true` is not 1, 1 is not true, "16" is not 16, 2.5 is not 2, no inf/NaN.

    Pydantic's lax mode would accept all of these; a config is typed by hand, so each is a mistake.
    One exception: text that spells a float is a float, because YAML 1.1 reads `1e-4` as a string.
    """
    kinds = _scalar_types(annotation)
    if isinstance(value, str) and value in _literal_words(annotation):
        return value  # e.g. train.lr: auto
    if bool in kinds and kinds <= {bool, type(None)}:
        if value is not None and not isinstance(value, bool):
            raise ValueError(f"expected true or false, not {value!r}")
        return value
    numeric = kinds & {int, float}
    if not numeric or bool in kinds:
        return value
    if isinstance(value, bool):
        raise ValueError(f"expected a number, not the boolean {str(value).lower()}")
    if isinstance(value, str) and str not in kinds:
        try:
            number = float(value) if float in kinds else None
        except ValueError:
            number = None
        if number is None:
            words = " or ".join(sorted(_literal_words(annotation)))
            if words:
                raise ValueError(f"expected a number or {words}")
            raise ValueError("expected a number, not text; write it without quotes")
        value = number
    if isinstance(value, float) and not math.isfinite(value):
        raise ValueError("must be a finite number (inf and NaN are not allowed)")
    if isinstance(value, float) and float not in kinds:
        raise ValueError("expected a whole number")
    return value
