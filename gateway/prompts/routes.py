"""Registry REST routes (`/v1/prompts`): every route, reads included, needs the admin key."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response, status

from gateway.auth import require_admin
from gateway.errors import ErrorResponse
from gateway.prompts.protocol import AddAdapter, JobOut, PromptList, PromptOut, RegisterPrompt, TrainSpec, VersionOut
from gateway.prompts.service import PromptService, job_out, version_out

ERRORS: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing or wrong admin key"},
    404: {"model": ErrorResponse, "description": "Unknown prompt"},
    409: {"model": ErrorResponse, "description": "The name is taken"},
    422: {"model": ErrorResponse, "description": "Invalid template, example, adapter or training data"},
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


@router.post("/{name}/adapters", status_code=status.HTTP_201_CREATED, response_model=VersionOut,
             summary="Upload an adapter as the prompt's next version; it is routable once ready")
async def add_adapter(name: str, body: AddAdapter, prompts: Prompts) -> VersionOut:
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
