"""Guide eligibility (beyond Knock)."""

from __future__ import annotations

from fastapi import APIRouter, Query

from audiences.api.dependencies import Reader
from audiences.api.models import ERRORS, GuideEligibility, GuideKey, Tenant, UserId
from audiences.api.service import tenant_of

router = APIRouter()


@router.get(
    "/v1/guides/{guide_key}/eligibility/{user_id}",
    response_model=GuideEligibility,
    responses=ERRORS,
    tags=["guides"],
    summary="Is the user eligible for a guide? (beyond Knock)",
)
def guide_eligibility(
    guide_key: GuideKey,
    user_id: UserId,
    caller: Reader,
    tenant: Tenant | None = Query(None, description="The request's tenant (strict mode)."),
):
    return caller.environment.guide_eligibility(guide_key, user_id, tenant_of(tenant))
