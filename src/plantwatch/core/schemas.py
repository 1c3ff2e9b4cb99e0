"""Shared request/response shapes: strict request bodies, list envelopes, paging."""

from __future__ import annotations

import re
from typing import Annotated, Any, Generic, TypeVar

from fastapi import Path, Query
from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, field_validator, model_validator

T = TypeVar("T")

MAX_PER_PAGE = 500
# Ids are BIGINT: a larger number would be a database error (500), so it is a 422 here.
MAX_DB_ID = 2**63 - 1
DbId = Annotated[int, Field(ge=1, le=MAX_DB_ID)]
PathId = Annotated[int, Path(ge=1, le=MAX_DB_ID)]
# For query-string filters, which reach SQL: no control characters at all.
QUERY_TEXT = r"^[^\x00-\x1f\x7f]*$"
CONTROL_CHARS = re.compile(r"[\x00-\x1f\x7f]")


def no_control_chars(value: str) -> str:
    """For single-line text (names, e-mails): control characters are never meaningful."""
    if CONTROL_CHARS.search(value):
        raise ValueError("control characters are not allowed")
    return value


def _not_null(value: Any) -> Any:
    if value is None:
        raise ValueError("may be omitted but not null")
    return value


# For PATCH fields that may be left out but not set to null.
NotNull = BeforeValidator(_not_null)


def _find_nul(value: Any) -> bool:
    if isinstance(value, str):
        return "\x00" in value
    if isinstance(value, dict):
        return any(_find_nul(k) or _find_nul(v) for k, v in value.items())
    if isinstance(value, list | tuple):
        return any(_find_nul(v) for v in value)
    return False


class RequestModel(BaseModel):
    """Base of every request body.

    Unknown fields are errors (a typo must not be silently ignored), except
    `factory_id`: the tenant always comes from the caller's token, so a body
    that names one is accepted and the value dropped.
    """

    model_config = ConfigDict(extra="forbid", str_strip_whitespace=True)

    @model_validator(mode="before")
    @classmethod
    def _drop_factory_id(cls, data: Any) -> Any:
        if isinstance(data, dict) and "factory_id" in data:
            data = {k: v for k, v in data.items() if k != "factory_id"}
        return data

    @field_validator("*", mode="before")
    @classmethod
    def _no_nul(cls, value: Any) -> Any:
        # PostgreSQL text cannot hold NUL: refuse it on every backend, in every field.
        if _find_nul(value):
            raise ValueError("must not contain NUL characters")
        return value


class ResponseModel(BaseModel):
    model_config = ConfigDict(from_attributes=True)


class PageMeta(BaseModel):
    page: int
    per_page: int
    total: int


class Item(BaseModel, Generic[T]):
    data: T


class Page(BaseModel, Generic[T]):
    data: list[T]
    meta: PageMeta

    @classmethod
    def of(cls, rows: list[T], total: int, params: PageParams) -> Page[T]:
        return cls(
            data=rows, meta=PageMeta(page=params.page, per_page=params.per_page, total=total)
        )


class PageParams(BaseModel):
    page: int = Field(1, ge=1)
    per_page: int = Field(50, ge=1, le=MAX_PER_PAGE)

    @property
    def offset(self) -> int:
        return (self.page - 1) * self.per_page


def page_params(
    page: int = Query(1, ge=1, description="Page number, from 1"),
    per_page: int = Query(50, ge=1, le=MAX_PER_PAGE, description="Rows per page"),
) -> PageParams:
    return PageParams(page=page, per_page=per_page)
