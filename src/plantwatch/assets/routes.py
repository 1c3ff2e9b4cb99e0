"""Assets API: sites, areas, lines, devices, groups, parameters, device keys."""

from __future__ import annotations

from fastapi import APIRouter

router = APIRouter(prefix="/api/v1")
