"""The API's request and response shapes (pydantic), and the bodies parsed straight from bytes.

They make the OpenAPI document at `/openapi.json` and validate every request.
"""

from __future__ import annotations

from typing import Annotated, Any, Required

from fastapi import Path
from pydantic import BaseModel, ConfigDict, Field, StringConstraints, TypeAdapter
from typing_extensions import TypedDict

from audiences.api.errors import ErrorBody
from audiences.api.identifiers import ID_PATTERN, DateTime, Id, TenantId
from audiences.conditions.definitions import KEY_PATTERN
from audiences.store.members import MAX_MEMBERS_PER_CALL

# -- request and response shapes ------------------------------------------------------------------

# An identifier is not blank (ASCII whitespace only) and holds no NUL; spelled out with an explicit
# character set so that the OpenAPI document and the validation agree on it. Path parameters are
# checked by the same pattern (and decoded paths hold no lone surrogates).
IDENTIFIER_PATTERN = r"^[^\x00]*[^\x00\t\n\x0b\x0c\r ][^\x00]*$"
TEXT_PATTERN = r"^[^\x00]*$"


# pydantic refuses lone surrogates in `str` fields itself; the patterns refuse NUL.
Identifier = Annotated[
    str, StringConstraints(min_length=1, max_length=255, pattern=IDENTIFIER_PATTERN)
]
# A member's tenant as a string: blank (no tenant) or an id, as `{"id": ...}` is.
Tenant = TenantId
Text = Annotated[str, StringConstraints(pattern=TEXT_PATTERN)]
AudienceKey = Annotated[
    str,
    Path(
        pattern=f"^{KEY_PATTERN.pattern}$",
        description="The audience key: lower-case letters, digits, '-' and '_'.",
    ),
]
GuideKey = Annotated[
    str, Path(pattern=f"^{KEY_PATTERN.pattern}$", description="The guide key (its folder's name).")
]
UserId = Annotated[
    str,
    Path(
        pattern=ID_PATTERN,
        max_length=255,
        description="The user's id (Knock's rule: no '/' or '#').",
    ),
]


# Request bodies are TypedDicts: validated as strictly as models (and described the same way in
# the OpenAPI document), but without building two model objects per member, which made validation
# the largest cost of a 1,000-member add.
class UserProperties(TypedDict, total=False):
    """Knock's user fields; any other property is a custom property (nested objects too).
    Properties are merged into the user's (a `null` removes one), as Knock's identify does."""

    __pydantic_config__ = ConfigDict(extra="allow")  # type: ignore[misc]
    name: Text | None
    email: Text | None
    phone_number: Text | None
    avatar: Text | None
    locale: Text | None
    timezone: Text | None
    created_at: DateTime | None


class InlineIdentifyUser(UserProperties, total=False):
    """Knock's `InlineIdentifyUserRequest`: `id` is required."""

    id: Required[Id]


class TenantProperties(TypedDict, total=False):
    """Knock's tenant fields: `name`, `settings` (branding, preference set); any other property
    is a custom property. Merged into the stored tenant (a `null` removes one). `channel_data` and
    `preferences` are accepted and not kept."""

    __pydantic_config__ = ConfigDict(extra="allow")  # type: ignore[misc]
    name: Text | None
    settings: dict[str, Any] | None


class InlineTenant(TenantProperties, total=False):
    """Knock's `InlineTenantRequest` as an object: `id` is required; it is set (upserted) with
    the members that name it."""

    id: Required[Id]


# Unknown keys are accepted and ignored, as Knock's schemas do (`additionalProperties`).
class AudienceMemberRequest(TypedDict, total=False):
    __pydantic_config__ = ConfigDict(extra="ignore")  # type: ignore[misc]
    user: Required[InlineIdentifyUser]
    tenant: Tenant | InlineTenant | None


class AudienceMembersRequest(TypedDict):
    __pydantic_config__ = ConfigDict(extra="ignore")  # type: ignore[misc]
    members: Annotated[
        list[AudienceMemberRequest],
        Field(
            max_length=MAX_MEMBERS_PER_CALL,
            description="Up to 1,000 members per request (Knock's limit).",
        ),
    ]


class User(BaseModel):
    model_config = ConfigDict(extra="allow", populate_by_name=True)
    typename: str = Field("User", alias="__typename")
    id: str
    updated_at: str


class AudienceMember(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    typename: str = Field("AudienceMember", alias="__typename")
    added_at: str
    user_id: str
    tenant: str | None
    user: User


class PageInfo(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    typename: str = Field("PageInfo", alias="__typename")
    page_size: int
    after: str | None
    before: str | None


class AudienceMembersPage(BaseModel):
    entries: list[AudienceMember]
    page_info: PageInfo


class Membership(BaseModel):
    model_config = ConfigDict(populate_by_name=True)
    typename: str = Field("AudienceMembership", alias="__typename")
    audience_key: str
    user_id: str
    tenant: str | None
    member: bool = Field(
        description="Tenant-strict: the membership's tenant equals the requested one "
        "(no tenant requested: only a membership without tenant counts)."
    )


class GuideEligibility(BaseModel):
    guide_key: str
    user_id: str
    tenant: str | None
    eligible: bool
    reason: str


class BroadcastRequest(BaseModel):
    model_config = ConfigDict(extra="ignore")
    workflow: Identifier = Field(description="The workflow key each member's trigger names.")
    data: dict[str, Any] = Field(default_factory=dict)
    tenant: Tenant | None = Field(None, description="Only members with this tenant.")
    sink: Identifier | None = Field(
        None, description="A sink of sinks.yml (default: its default sink)."
    )
    broadcast_id: Identifier | None = Field(
        None, description="Default: a hash of the broadcast's content."
    )


class BroadcastResult(BaseModel):
    broadcast_id: str
    recipients: int
    new_deliveries: int


class UploadRejection(BaseModel):
    row: int = Field(description="The row's number in the file (the header is row 0).")
    reason: str
    id: str | None


class UploadAnswer(BaseModel):
    """An upload recorded: its members are journaled with its rows, and every read sees them
    (with their events) from this answer on; the users' properties follow within moments."""

    rows: int
    blank_lines: int
    members_added: int
    members_unchanged: int
    users_identified: int
    rejected: list[UploadRejection]


UPLOAD_BODY = {
    "requestBody": {
        "required": True,
        "description": "The CSV file, as `audiences upload` reads it (a header row; `id` or "
        "`user_id`, or a column mapped to `id`).",
        "content": {"text/csv": {"schema": {"type": "string"}}},
    }
}


ERRORS = {
    status: {"model": ErrorBody, "description": description}
    for status, description in {
        400: "The request could not be read (a request line or headers too long, or malformed).",
        401: "No key (`api_key_missing`), or a key that does not exist or was revoked "
        "(`authentication_required`).",
        404: "No such audience, user or guide.",
        413: "The request body is over the limit.",
        422: "Bad input; `errors` names the field.",
        429: "Over the environment's rate limit for the endpoint's tier; `Retry-After` says "
        "when to retry.",
    }.items()
}


# -- the application ------------------------------------------------------------------------------


# The members body is parsed by pydantic-core straight from the request's bytes (several times
# faster than `json.loads` and validating the result, on the API's busiest route); FastAPI then
# does not see it, so the OpenAPI document gets its schema here.
MEMBERS_ADAPTER = TypeAdapter(AudienceMembersRequest)
MEMBERS_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/AudienceMembersRequest"}}
        },
    }
}


# Bodies that routes parse themselves (`parsed_body`), by schema name: the OpenAPI document gets
# their schemas from here.
BODY_SCHEMAS: dict[str, TypeAdapter] = {}


def json_body(schema: str, adapter: TypeAdapter | None = None, required: bool = True) -> dict:
    """The OpenAPI `requestBody` of a route that reads its JSON body itself (`parsed_body`);
    `adapter`'s schema goes into the document's components under `schema`."""
    if adapter is not None:
        BODY_SCHEMAS[schema] = adapter
    return {
        "requestBody": {
            "required": required,
            "content": {"application/json": {"schema": {"$ref": f"#/components/schemas/{schema}"}}},
        }
    }


BROADCAST_ADAPTER = TypeAdapter(BroadcastRequest)
BODY_SCHEMAS["BroadcastRequest"] = BROADCAST_ADAPTER
# Identify's body too: pydantic-core's parser refuses nesting too deep for the stack (where
# `json.loads` raises RecursionError).
PROPERTIES_ADAPTER = TypeAdapter(UserProperties)
PROPERTIES_BODY = {
    "requestBody": {
        "required": True,
        "content": {
            "application/json": {"schema": {"$ref": "#/components/schemas/UserProperties"}}
        },
    }
}


# Census's HTTP-request destination removes records with `DELETE ...?members=[...]` and no body
# (Knock's recipe), so removal also reads the members from the query.
REMOVE_MEMBERS = {
    "requestBody": {**MEMBERS_BODY["requestBody"], "required": False},
    "parameters": [
        {
            "name": "members",
            "in": "query",
            "required": False,
            "description": "The members as a JSON array, instead of a body (Census's HTTP destination).",
            "content": {
                "application/json": {
                    "schema": {
                        "type": "array",
                        "maxItems": MAX_MEMBERS_PER_CALL,
                        "items": {"$ref": "#/components/schemas/AudienceMemberRequest"},
                    }
                }
            },
        }
    ],
}
