"""Registry REST routes (`/v1/prompts`): every route, reads included, needs the admin key."""

from __future__ import annotations

import json
from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, Response, status
from fastapi.exceptions import RequestValidationError
from pydantic import ValidationError

from gateway.auth import require_admin
from gateway.errors import APIError, BadRequest, ErrorResponse
from gateway.prompts.imports import (
    CONFIG_FILE,
    MANIFEST_FILE,
    MAX_JSON_BYTES,
    UPLOAD_FIELDS,
    WEIGHTS_FILE,
    upload_parts,
)
from gateway.prompts.protocol import (
    AddAdapter,
    JobOut,
    PatchPrompt,
    PromptList,
    PromptOut,
    RegisterPrompt,
    TrafficList,
    TrainSpec,
    VersionOut,
)
from gateway.prompts.service import PromptService, job_out, version_out

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing or wrong admin key"},
    404: {"model": ErrorResponse, "description": "Unknown prompt"},
    409: {"model": ErrorResponse, "description": "The name is taken"},
    422: {"model": ErrorResponse, "description": "Invalid template, example, adapter or training data"},
    503: {"model": ErrorResponse, "description": "The prompt registry's database did not answer: retry after "
                                                 "`Retry-After` seconds"},
}

router = APIRouter(prefix="/v1/prompts", tags=["Registry"], dependencies=[Depends(require_admin)], responses=ERRORS)


async def get_prompts(request: Request) -> PromptService:
    return request.app.state.prompts  # type: ignore[no-any-return]


Prompts = Annotated[PromptService, Depends(get_prompts)]


@router.post("", status_code=status.HTTP_201_CREATED, response_model=PromptOut,
             summary="Register a recurring prompt (optionally with an adapter, or a training job)")
async def register_prompt(body: RegisterPrompt, prompts: Prompts) -> PromptOut:
    record = await prompts.register(body)
    return prompts.describe(record)


@router.get("", response_model=PromptList, summary="List registered prompts")
async def list_prompts(prompts: Prompts) -> PromptList:
    return PromptList(data=[prompts.describe(r) for r in await prompts.list_prompts()])


@router.get("/{name}", response_model=PromptOut, summary="One prompt, with versions and its latest job")
async def get_prompt(name: str, prompts: Prompts) -> PromptOut:
    return prompts.describe(await prompts.get_prompt(name))


@router.patch("/{name}", response_model=PromptOut,
              summary="Change a prompt's settings (`record`, `guard`, `serving`): a JSON merge patch, `null` turns "
                      "a setting off")
async def patch_prompt(name: str, body: PatchPrompt, prompts: Prompts) -> PromptOut:
    return prompts.describe(await prompts.patch(name, body))


@router.get("/{name}/traffic", response_model=TrafficList,
            summary="The prompt's recorded fallback answers (slot values and the answer served), newest first")
async def get_traffic(name: str, prompts: Prompts,
                      limit: Annotated[int | None, Query(ge=1, le=100_000)] = None) -> TrafficList:
    return await prompts.traffic(name, limit)


@router.delete("/{name}/traffic", status_code=status.HTTP_204_NO_CONTENT,
               summary="Purge the prompt's recorded answers (a job already queued keeps its own copy)")
async def purge_traffic(name: str, prompts: Prompts) -> Response:
    await prompts.purge_traffic(name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)


class UnsupportedMediaType(APIError):
    status_code = 415
    error_type = "invalid_request_error"


def _file_part(description: str) -> dict[str, Any]:
    return {"type": "string", "format": "binary", "contentMediaType": "application/octet-stream",
            "description": description}


ADD_ADAPTER_BODY: dict[str, Any] = {"required": True, "content": {
    "application/json": {"schema": AddAdapter.model_json_schema()},
    "multipart/form-data": {
        "schema": {"type": "object", "required": [CONFIG_FILE, WEIGHTS_FILE], "additionalProperties": False,
                   "properties": {
                       CONFIG_FILE: _file_part("The PEFT LoRA config (`peft_type` LORA, rank within MAX_LORA_RANK)."),
                       WEIGHTS_FILE: _file_part("The LoRA weights, safetensors only (no pickled .bin)."),
                       MANIFEST_FILE: _file_part("Optional: the trainer's manifest (`inference` is honoured)."),
                   }},
        "encoding": {CONFIG_FILE: {"contentType": "application/json"},
                     WEIGHTS_FILE: {"contentType": "application/octet-stream"},
                     MANIFEST_FILE: {"contentType": "application/json"}},
    },
}}


async def adapter_path_body(request: Request) -> AddAdapter:
    """The JSON form of the request, parsed and validated as FastAPI would for a declared body."""
    media = request.headers.get("content-type", "application/json").split(";")[0].strip().lower()
    if media != "application/json" and not media.endswith("+json"):
        raise UnsupportedMediaType(f"send application/json with {{\"adapter_path\": ...}} or multipart/form-data with "
                                   f"{CONFIG_FILE} and {WEIGHTS_FILE}, not {media or 'no content type'}",
                                   code="unsupported_media_type")
    try:
        payload = json.loads(await request.body())
    except (ValueError, RecursionError) as exc:
        raise BadRequest(f"the request body is not valid JSON: {exc}", code="invalid_json") from exc
    try:
        return AddAdapter.model_validate(payload)
    except ValidationError as exc:
        raise RequestValidationError(exc.errors(include_url=False), body=payload) from exc


@router.post("/{name}/adapters", status_code=status.HTTP_201_CREATED, response_model=VersionOut,
             summary="Add an adapter as the prompt's next version: a folder in IMPORT_DIR, or its files uploaded",
             description=f"JSON `{{\"adapter_path\"}}` names a folder inside the gateway's import folder "
                         f"(PROMPTINTERN_IMPORT_DIR); multipart/form-data uploads the files themselves ({CONFIG_FILE}, "
                         f"{WEIGHTS_FILE}, optionally {MANIFEST_FILE}), up to MAX_UPLOAD_BYTES. Either way the "
                         "adapter is checked by loading it onto the base model, and routed to once ready.",
             openapi_extra={"requestBody": ADD_ADAPTER_BODY},
             responses={413: {"model": ErrorResponse, "description": "The upload is larger than MAX_UPLOAD_BYTES"},
                        415: {"model": ErrorResponse, "description": "Neither JSON nor multipart/form-data"}})
async def add_adapter(name: str, request: Request, prompts: Prompts) -> VersionOut:
    if request.headers.get("content-type", "").lower().startswith("multipart/form-data"):
        await prompts.get_prompt(name)  # a 404 before the upload is read
        fields = len(UPLOAD_FIELDS) + 1  # one more than allowed, so an extra field gets a 422 naming it
        async with request.form(max_files=fields, max_fields=fields, max_part_size=MAX_JSON_BYTES) as form:
            return version_out(await prompts.upload_adapter(name, upload_parts(form.multi_items())))
    body = await adapter_path_body(request)
    return version_out(await prompts.add_adapter(name, body.adapter_path))


@router.post("/{name}/train", status_code=status.HTTP_202_ACCEPTED, response_model=JobOut,
             summary="Queue a training job: the prompt is internalised into a new adapter version")
async def train_prompt(name: str, body: TrainSpec, prompts: Prompts) -> JobOut:
    return job_out(await prompts.train(name, body))


@router.delete("/{name}", status_code=status.HTTP_204_NO_CONTENT,
               summary="Delete a prompt: routing stops at once, adapters unloaded, jobs cancelled, files removed")
async def delete_prompt(name: str, prompts: Prompts) -> Response:
    await prompts.delete(name)
    return Response(status_code=status.HTTP_204_NO_CONTENT)
