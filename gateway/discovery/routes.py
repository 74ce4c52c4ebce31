"""Discovery routes: `GET /v1/prompts/candidates` and `POST /v1/prompts/candidates/{id}/register` (admin key).

Included before the registry's routes, so `candidates` is never read as a prompt's name (it is a reserved one)."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Query, Request, status

from gateway.auth import require_admin
from gateway.discovery.protocol import CandidateList, RegisterCandidate
from gateway.discovery.service import PromptDiscovery
from gateway.errors import NotFound
from gateway.prompts.protocol import PromptOut
from gateway.prompts.routes import ERRORS, Prompts

router = APIRouter(prefix="/v1/prompts/candidates", tags=["Discovery"], dependencies=[Depends(require_admin)])

RESPONSES: dict[int | str, dict[str, Any]] = {
    401: ERRORS[401],
    404: {"model": ERRORS[404]["model"], "description": "Unknown candidate, or discovery is off (DISCOVERY=false)"},
    503: ERRORS[503],
}


async def get_discovery(request: Request) -> PromptDiscovery:
    discovery: PromptDiscovery | None = request.app.state.discovery
    if discovery is None:
        raise NotFound("prompt discovery is off (PROMPTINTERN_DISCOVERY=false)", code="discovery_off")
    return discovery


Discovery = Annotated[PromptDiscovery, Depends(get_discovery)]


@router.get("", response_model=CandidateList, responses=RESPONSES,
            summary="Recurring prompts found in passthrough traffic, highest projected saving first")
async def list_candidates(discovery: Discovery,
                          tenant: Annotated[str | None, Query(description="Only this tenant's candidates")] = None
                          ) -> CandidateList:
    return CandidateList(data=await discovery.candidates(tenant))


@router.post("/{candidate_id}/register", status_code=status.HTTP_201_CREATED, response_model=PromptOut,
             responses={**RESPONSES, 409: ERRORS[409], 422: ERRORS[422]},
             summary="Register a candidate as a prompt (slots renamed as asked); it leaves the list")
async def register_candidate(candidate_id: str, body: RegisterCandidate, discovery: Discovery,
                             prompts: Prompts) -> PromptOut:
    return prompts.describe(await discovery.register(candidate_id, body, prompts))
