"""Shared request/response shapes: strict request bodies, list envelopes, paging."""

from __future__ import annotations

from typing import Any, Generic, TypeVar

from fastapi import Query
from pydantic import BaseModel, ConfigDict, Field, model_validator

T = TypeVar("T")

MAX_PER_PAGE = 500


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
