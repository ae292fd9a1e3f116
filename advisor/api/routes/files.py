"""/v1/files: training data uploads in OpenAI's shape (multipart `file` + `purpose=fine-tune`).

Each upload is validated line by line while it is written (JSON per line, chat or prompt/completion,
size and example limits); a bad file gets 400 naming its first bad line (`line` in the body) and
leaves nothing on disk. Uploads have their own body limit (ADVISOR_MAX_FILE_BYTES plus the
multipart envelope) instead of the service-wide ADVISOR_MAX_BODY_BYTES.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from fastapi import APIRouter, Depends, File, Form, Path, Query, UploadFile
from fastapi.responses import FileResponse
from pydantic import BaseModel

from advisor.api.auth import ApiKey, require_api_key
from advisor.api.deps import Jobs
from advisor.api.errors import error_responses
from advisor.api.routes.listing import list_model, page_of
from advisor.jobs import objects

router = APIRouter(
    prefix="/v1", tags=["files"], dependencies=[Depends(require_api_key)], responses=error_responses(401)
)

FileId = Annotated[str, Path(max_length=64, description="a file id (file-...)")]


class FileObject(BaseModel):
    id: str
    object: Literal["file"]
    bytes: int
    created_at: int
    filename: str
    purpose: str
    status: str
    status_details: str | None
    expires_at: int | None
    examples: int | None = None
    format: str | None = None


FileList = list_model("FileList", FileObject)


class FileDeleted(BaseModel):
    id: str
    object: Literal["file"]
    deleted: bool


@router.post(
    "/files",
    operation_id="createFile",
    summary="Upload a JSONL training file (validated before it is kept)",
    response_model=FileObject,
    responses={**error_responses(400, 413, 422), 400: {"description": "invalid file: `line` names the first bad line"}},
)
def create_file(
    caller: ApiKey,
    jobs: Jobs,
    file: Annotated[UploadFile, File(description="JSONL: chat ({messages}) or prompt/completion")],
    purpose: Annotated[str, Form(max_length=64, description="fine-tune")],
) -> Any:
    return objects.file_object(jobs.upload(caller.key_id, file.filename or "upload.jsonl", purpose, file.file))


@router.get("/files", operation_id="listFiles", summary="Your files, newest first", response_model=FileList)
def list_files(
    caller: ApiKey,
    jobs: Jobs,
    purpose: Annotated[str | None, Query(max_length=64)] = None,
    after: Annotated[str | None, Query(max_length=64)] = None,
    limit: Annotated[int, Query(ge=1, le=10_000)] = 100,
    order: Literal["asc", "desc"] = "desc",
) -> Any:
    listing = jobs.store.list_files(caller.key_id, purpose=purpose, after=after, limit=limit, order=order)
    return page_of(listing, objects.file_object)


@router.get(
    "/files/{file_id}",
    operation_id="retrieveFile",
    summary="One file",
    response_model=FileObject,
    responses=error_responses(404),
)
def get_file(file_id: FileId, caller: ApiKey, jobs: Jobs) -> Any:
    return objects.file_object(jobs.file(caller.key_id, file_id))


@router.get(
    "/files/{file_id}/content",
    operation_id="downloadFile",
    summary="A file's content (training data, or a job's step_metrics.csv result file)",
    response_class=FileResponse,
    responses={**error_responses(404), 200: {"content": {"application/octet-stream": {}}}},
)
def file_content(file_id: FileId, caller: ApiKey, jobs: Jobs) -> Any:
    row = jobs.file(caller.key_id, file_id)
    return FileResponse(row["path"], filename=row["filename"], media_type="application/octet-stream")


@router.delete(
    "/files/{file_id}",
    operation_id="deleteFile",
    summary="Delete a file (refused while an active job uses it)",
    response_model=FileDeleted,
    responses=error_responses(404, 409),
)
def delete_file(file_id: FileId, caller: ApiKey, jobs: Jobs) -> Any:
    return {"id": jobs.delete_file(caller.key_id, file_id)["id"], "object": "file", "deleted": True}
