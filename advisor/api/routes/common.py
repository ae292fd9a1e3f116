"""What /v1/files and /v1/fine_tuning share: OpenAI's list envelope and its cursor pages.

A list answers ``{object: "list", data, has_more, first_id, last_id}``; a page goes on from the id in
``after`` (the previous page's ``last_id``).
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, Literal

from fastapi import Query
from pydantic import BaseModel, create_model

from advisor.jobs import objects

Row = dict[str, Any]

#: the cursor of a page: the last id of the previous one
Cursor = Annotated[str | None, Query(max_length=64, description="the last id of the previous page")]


def list_model(name: str, item: type[BaseModel]) -> type[BaseModel]:
    """The list envelope of `item`s, named `name` in the OpenAPI document."""
    return create_model(
        name,
        object=(Literal["list"], ...),
        data=(list[item], ...),  # type: ignore[valid-type]
        has_more=(bool, ...),
        first_id=(str | None, None),
        last_id=(str | None, None),
    )


def page_of(listing: tuple[list[Row], bool], to_object: Callable[[Row], Row]) -> Row:
    """A store listing (rows, has_more) as one page of API objects."""
    rows, more = listing
    return objects.page([to_object(r) for r in rows], more)
