"""/v1/files: training data uploads in OpenAI's shape (multipart `file` + `purpose=fine-tune`).

Each upload is validated line by line while it is written (JSON per line, chat or prompt/completion,
size and example limits); a bad file gets 400 naming its first bad line (`line` in the body) and
leaves nothing on disk. Uploads have their own body limit (ADVISOR_MAX_FILE_BYTES plus the
multipart envelope) instead of the service-wide ADVISOR_MAX_BODY_BYTES.
"""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, File, Form, Path, Query, UploadFile
from fastapi.responses import FileResponse

from advisor.api.auth import ApiKey, require_api_key
from advisor.api.deps import Jobs
from advisor.api.errors import error_responses
from advisor.api.routes.common import page_of, paging, route
from advisor.api.schemas import FileDeleted, FileList, FileObject
from advisor.jobs import objects

router = APIRouter(
    prefix="/v1", tags=["files"], dependencies=[Depends(require_api_key)], responses=error_responses(401)
)

FileId = Annotated[str, Path(max_length=64, description="a file id (file-...)")]


def owned_file(file_id: FileId, caller: ApiKey, jobs: Jobs) -> dict[str, Any]:
    """The caller's file `file_id`; NotFoundError (404) for anyone else's."""
    return jobs.file(caller.key_id, file_id)


OwnedFile = Annotated[dict[str, Any], Depends(owned_file)]


@route(
    router.post,
    "/files",
    "createFile",
    "Upload a JSONL training file (validated before it is kept)",
    FileObject,
    errors=(400, 413, 422),
    responses={400: {"description": "invalid file: `line` names the first bad line"}},
)
def create_file(
    caller: ApiKey,
    jobs: Jobs,
    file: Annotated[UploadFile, File(description="JSONL: chat ({messages}) or prompt/completion")],
    purpose: Annotated[str, Form(max_length=64, description="fine-tune")],
) -> Any:
    return objects.file_object(jobs.upload(caller.key_id, file.filename or "upload.jsonl", purpose, file.file))


@route(router.get, "/files", "listFiles", "Your files, newest first", FileList)
def list_files(
    caller: ApiKey,
    jobs: Jobs,
    page: paging(100, 10_000, ordered=True),  # type: ignore[valid-type]
    purpose: Annotated[str | None, Query(max_length=64)] = None,
) -> Any:
    listing = jobs.store.list_files(caller.key_id, purpose=purpose, **page.query)
    return page_of(listing, objects.file_object)


@route(router.get, "/files/{file_id}", "retrieveFile", "One file", FileObject, errors=(404,))
def get_file(row: OwnedFile) -> Any:
    return objects.file_object(row)


@route(
    router.get,
    "/files/{file_id}/content",
    "downloadFile",
    "A file's content (training data, or a job's step_metrics.csv result file)",
    response_class=FileResponse,
    errors=(404,),
    responses={200: {"content": {"application/octet-stream": {}}}},
)
def file_content(row: OwnedFile) -> Any:
    return FileResponse(row["path"], filename=row["filename"], media_type="application/octet-stream")


@route(
    router.delete,
    "/files/{file_id}",
    "deleteFile",
    "Delete a file (refused while an active job uses it)",
    FileDeleted,
    errors=(404, 409),
)
def delete_file(file_id: FileId, caller: ApiKey, jobs: Jobs) -> Any:
    return {"id": jobs.delete_file(caller.key_id, file_id)["id"], "object": "file", "deleted": True}
