"""Telemetry import and export API (logic in `telemetry.transfer`)."""

from __future__ import annotations

import tempfile
from dataclasses import dataclass
from typing import IO, Annotated, Literal

from fastapi import APIRouter, Depends, Query, Request
from fastapi.responses import StreamingResponse
from pydantic import AwareDatetime, BaseModel, Field
from sqlalchemy.ext.asyncio import AsyncSession
from starlette.datastructures import FormData, UploadFile
from starlette.types import Message

from plantwatch.core.errors import Problem
from plantwatch.core.schemas import CONTROL_CHARS, Item
from plantwatch.telemetry import transfer
from plantwatch.tenancy.audit import record
from plantwatch.tenancy.auth import Principal, container, db_session, require

router = APIRouter(prefix="/api/v1/telemetry", tags=["telemetry"])
Session = Annotated[AsyncSession, Depends(db_session)]

# Uploads are spooled to a temporary file past this size, and refused past the limit.
MAX_IMPORT_BYTES = 256 * 1024 * 1024
_SPOOL_BYTES = 8 * 1024 * 1024
MAX_EXPORT_DEVICES = 1_000
MAX_EXPORT_PARAMETERS = 1_000


class ImportResultOut(BaseModel):
    format: str = Field(description="csv or parquet (sniffed from the content)")
    layout: str = Field(description="wide (a column per parameter) or long (parameter, value)")
    rows: int = Field(description="Data rows read")
    values_stored: int = Field(description="Numbers and state texts stored")
    rejected: int = Field(description="Rejected rows and values; each is a dead letter")
    rejected_by_reason: dict[str, int]
    devices: int = Field(description="Devices that got data")
    unknown_devices: list[str] = Field(description="Device keys the factory does not have")
    first_timestamp: str | None
    last_timestamp: str | None


class _TooLarge(Exception):
    pass


def _too_large() -> Problem:
    return Problem(
        f"the upload exceeds the limit of {MAX_IMPORT_BYTES} bytes",
        status=413,
        code="payload_too_large",
    )


@dataclass
class _Upload:
    file: IO[bytes]
    form: FormData | None = None

    async def close(self) -> None:
        if self.form is not None:
            await self.form.close()
        else:
            self.file.close()


async def _upload(request: Request) -> _Upload:
    """The uploaded file as a seekable binary file, read no further than the limit.

    Multipart (field `file`, or the only file field) or the raw body.
    """
    declared = request.headers.get("content-length")
    if declared and declared.isdigit() and int(declared) > MAX_IMPORT_BYTES:
        raise _too_large()
    received = 0

    async def limited() -> Message:
        nonlocal received
        message = await request.receive()
        if message["type"] == "http.request":
            received += len(message.get("body", b""))
            if received > MAX_IMPORT_BYTES:
                raise _TooLarge()
        return message

    bounded = Request(request.scope, limited)
    content_type = request.headers.get("content-type", "")
    try:
        if content_type.startswith("multipart/form-data"):
            form = await bounded.form(max_files=1, max_fields=10)
            upload = form.get("file")
            if not isinstance(upload, UploadFile):
                files = [v for v in form.values() if isinstance(v, UploadFile)]
                upload = files[0] if files else None
            if upload is None:
                await form.close()
                raise Problem(
                    "multipart upload without a file (send it in the field 'file')",
                    status=422,
                    code="invalid_import_file",
                )
            upload.file.seek(0)
            return _Upload(upload.file, form)
        spool: IO[bytes] = tempfile.SpooledTemporaryFile(max_size=_SPOOL_BYTES)  # noqa: SIM115
        try:
            async for chunk in bounded.stream():
                spool.write(chunk)
        except BaseException:
            spool.close()
            raise
        spool.seek(0)
        return _Upload(spool)
    except _TooLarge:
        raise _too_large() from None


@router.post(
    "/import",
    summary="Import (backfill) telemetry from CSV or Parquet, any age",
    description=(
        "Send the file as multipart/form-data (field `file`) or as the raw body "
        "(`text/csv`, `application/vnd.apache.parquet`). Layouts: `device_key, timestamp, "
        "<one column per parameter>` or `device_key, parameter, timestamp, value`. Rows go "
        "through the ingest pipeline; unknown devices and bad cells become dead letters "
        "(source `import`). See docs/import-export.md."
    ),
    openapi_extra={
        "requestBody": {
            "content": {
                "text/csv": {"schema": {"type": "string"}},
                "application/vnd.apache.parquet": {
                    "schema": {"type": "string", "format": "binary"}
                },
                "multipart/form-data": {
                    "schema": {
                        "type": "object",
                        "properties": {"file": {"type": "string", "format": "binary"}},
                        "required": ["file"],
                    }
                },
            }
        }
    },
)
async def import_telemetry(
    request: Request,
    principal: Annotated[Principal, Depends(require("telemetry:write"))],
    session: Session,
) -> Item[ImportResultOut]:
    c = container(request)
    # End the auth read before the pipeline writes: SQLite cannot turn an old read
    # snapshot into the audit write afterwards.
    await session.commit()
    upload = await _upload(request)
    try:
        report = await transfer.import_file(c.db, c.pipeline, principal.factory_id, upload.file)
    finally:
        await upload.close()
    summary = report.as_dict()
    record(
        session,
        principal,
        "telemetry.import",
        "telemetry",
        None,
        after={k: summary[k] for k in ("format", "rows", "values_stored", "rejected")},
    )
    await session.commit()
    return Item(data=ImportResultOut(**summary))


def _split(values: list[str] | None, limit: int, name: str) -> list[str] | None:
    """Repeated and/or comma-separated query values."""
    if values is None:
        return None
    items = [part.strip() for value in values for part in value.split(",") if part.strip()]
    if any(CONTROL_CHARS.search(item) or len(item) > 100 for item in items):
        raise Problem(f"invalid {name}", status=422, code="validation_error")
    if len(items) > limit:
        raise Problem(f"at most {limit} {name}", status=422, code="validation_error")
    return items or None


def _ids(values: list[str] | None) -> list[int] | None:
    items = _split(values, MAX_EXPORT_DEVICES, "device ids")
    if items is None:
        return None
    try:
        ids = [int(item) for item in items]
    except ValueError:
        raise Problem("device_ids must be integers", status=422, code="validation_error") from None
    if any(not 1 <= i < 2**63 for i in ids):
        raise Problem("device_ids out of range", status=422, code="validation_error")
    return ids


def _ms(value: AwareDatetime | None) -> int | None:
    return None if value is None else int(value.timestamp() * 1000)


@router.get(
    "/export",
    summary="Export raw telemetry as CSV, NDJSON or Parquet, streamed",
    description=(
        "Raw samples `(device_key, parameter, timestamp, value)` of the caller's factory, "
        "series by series in time order. `device_ids` and `parameters` take repeated or "
        "comma-separated values; a device id that is not this factory's answers 404. "
        "`json` is NDJSON (one point per line). See docs/import-export.md."
    ),
    response_class=StreamingResponse,
    responses={
        200: {
            "content": {
                "text/csv": {},
                "application/x-ndjson": {},
                "application/vnd.apache.parquet": {},
            }
        }
    },
)
async def export_telemetry(
    request: Request,
    principal: Annotated[Principal, Depends(require("telemetry:read"))],
    session: Session,
    device_ids: Annotated[list[str] | None, Query(description="Ids, repeated or a,b,c")] = None,
    parameters: Annotated[list[str] | None, Query(description="Keys, repeated or a,b,c")] = None,
    start: AwareDatetime | None = None,
    end: AwareDatetime | None = None,
    format: Literal["csv", "json", "parquet"] = "csv",
) -> StreamingResponse:
    c = container(request)
    start_ms, end_ms = _ms(start), _ms(end)
    if start_ms is not None and end_ms is not None and start_ms >= end_ms:
        raise Problem("start must be before end", status=422, code="validation_error")
    if format == "parquet" and not transfer.parquet_available():
        raise transfer.ParquetUnavailable()
    series = await transfer.export_series(
        session,
        principal.factory_id,
        device_ids=_ids(device_ids),
        parameters=_split(parameters, MAX_EXPORT_PARAMETERS, "parameters"),
    )
    record(
        session,
        principal,
        "telemetry.export",
        "telemetry",
        None,
        after={
            "format": format,
            "series": len(series),
            "start": None if start is None else start.isoformat(),
            "end": None if end is None else end.isoformat(),
        },
    )
    await session.commit()
    filename = f"telemetry-{principal.factory_slug}.{transfer.EXPORT_SUFFIXES[format]}"
    return StreamingResponse(
        transfer.export_stream(c.db, series, format, start_ms, end_ms),
        media_type=transfer.EXPORT_MEDIA_TYPES[format],
        headers={"Content-Disposition": f'attachment; filename="{filename}"'},
    )
