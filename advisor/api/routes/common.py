"""What the routers share: one decorator for a documented route, and (for /v1/files and
/v1/fine_tuning) OpenAI's list envelope and its cursor pages.

A list answers ``{object: "list", data, has_more, first_id, last_id}``; a page goes on from the id in
``after`` (the previous page's ``last_id``).
"""

from __future__ import annotations

import inspect
from collections.abc import Callable
from dataclasses import asdict, dataclass
from typing import Annotated, Any, Literal, TypeVar

from fastapi import Depends, Query
from pydantic import BaseModel

from advisor.api.errors import error_responses
from advisor.api.schemas import openai_list
from advisor.jobs import objects

Row = dict[str, Any]
Endpoint = TypeVar("Endpoint", bound=Callable[..., Any])


def route(
    register: Callable[..., Callable[[Endpoint], Endpoint]],
    path: str,
    operation_id: str,
    summary: str,
    response_model: Any = None,
    *,
    errors: tuple[int, ...] = (),
    responses: dict[int | str, dict[str, Any]] | None = None,
    **more: Any,
) -> Callable[[Endpoint], Endpoint]:
    """``@route(router.get, path, operation_id, summary, Model, errors=(404,))``: the route, its error
    statuses documented with the ErrorResponse body (`responses` adds to or overrides them)."""
    if response_model is not None:  # else FastAPI's default (from the return annotation) stays
        more["response_model"] = response_model
    documented = {**error_responses(*errors), **(responses or {})}
    return register(path, operation_id=operation_id, summary=summary, responses=documented, **more)


#: the cursor of a page: the last id of the previous one
Cursor = Annotated[str | None, Query(max_length=64, description="the last id of the previous page")]
Order = Annotated[Literal["asc", "desc"], Query(description="desc (newest first, OpenAI's) or asc to follow a log")]


@dataclass(frozen=True)
class Page:
    """Which page a list route answers: the store's listing takes it as keywords (``**page.query``)."""

    after: str | None
    limit: int
    order: Literal["asc", "desc"] | None = None

    @property
    def query(self) -> dict[str, Any]:
        return {k: v for k, v in asdict(self).items() if not (k == "order" and v is None)}


def paging(default: int, most: int, *, ordered: bool = False) -> Any:
    """``Annotated[Page, Depends(...)]`` reading the query parameters `after`, `limit` (1 to `most`,
    default `default`) and, when `ordered`, `order` (default desc)."""
    keyword = inspect.Parameter.KEYWORD_ONLY
    params = [
        inspect.Parameter("after", keyword, default=None, annotation=Cursor),
        inspect.Parameter("limit", keyword, default=default, annotation=Annotated[int, Query(ge=1, le=most)]),
    ]
    if ordered:
        params.append(inspect.Parameter("order", keyword, default="desc", annotation=Order))

    def page(**query: Any) -> Page:
        return Page(**query)

    page.__signature__ = inspect.Signature(params, return_annotation=Page)  # type: ignore[attr-defined]
    return Annotated[Page, Depends(page)]


def list_model(name: str, item: type[BaseModel]) -> type[BaseModel]:
    """The list envelope of `item`s, named `name` in the OpenAPI document."""
    return openai_list(name, item)


def page_of(listing: tuple[list[Row], bool], to_object: Callable[[Row], Row]) -> Row:
    """A store listing (rows, has_more) as one page of API objects."""
    rows, more = listing
    return objects.page([to_object(r) for r in rows], more)
