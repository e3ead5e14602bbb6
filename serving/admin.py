"""Labels, label requests and routing: the admin endpoints' bodies and what each does to the outcome store.

The bodies are pydantic models, so their checks are declared in the OpenAPI document and a bad field
is a 422 naming it (`labels[0].label`, `weights.challenger`, `mode`).
"""

from __future__ import annotations

import asyncio
from collections.abc import Callable, Mapping
from typing import Annotated, Any

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, WithJsonSchema, field_validator, model_validator
from pydantic.json_schema import GetJsonSchemaHandler, JsonSchemaValue
from pydantic_core import CoreSchema, PydanticCustomError

from rollout.cd.label_requests import request_labels
from rollout.config import Mode, Policy
from rollout.outcomes import OutcomeStore
from rollout.roles import Role, is_challenger
from rollout.times import to_epoch
from serving.errors import RequestError
from serving.logwriter import LogWriter
from serving.routing import RoutingView

LABEL_ROWS_FACTOR = 10  # a label upload may hold this many times serving.max_request_rows


def _epoch(value: Any) -> float:
    try:
        return to_epoch(value)
    except (TypeError, ValueError) as exc:
        raise PydanticCustomError("time", "{reason}", {"reason": str(exc)}) from exc


def _number(value: Any) -> float:
    if isinstance(value, bool):  # JSON true/false as 1/0
        return int(value)
    if not isinstance(value, int | float):
        raise PydanticCustomError("number", "expected a number, got {value}", {"value": repr(value)})
    return value


# Text the store keeps: no NUL byte (PostgreSQL refuses it in any text column).
Text = Annotated[str, Field(pattern=r"^[^\x00]*$")]
# A registry version as the store keeps it (String(32)).
VersionId = Annotated[str, Field(pattern=r"^[A-Za-z0-9._-]{1,32}$")]
# ISO 8601 or epoch seconds; the store records it instead of the clock.
Time = Annotated[float, BeforeValidator(_epoch),
                 WithJsonSchema({"anyOf": [{"type": "number"}, {"type": "string", "format": "date-time"}]})]
Label = Annotated[float, BeforeValidator(_number), Field(allow_inf_nan=False)]
Weight = Annotated[float, Field(strict=True, ge=0, le=1)]


class LabelItem(BaseModel):
    """The true outcome of one earlier prediction."""

    request_id: str = Field(min_length=1, max_length=64, pattern=r"^[^\x00]+$")
    label: Label
    ts: Time | None = None


class LabelsBody(BaseModel):
    """`{"labels": [...]}`, or the bare list."""

    labels: list[LabelItem]

    @model_validator(mode="before")
    @classmethod
    def _bare_list(cls, value: Any) -> Any:
        return {"labels": value} if isinstance(value, list) else value

    @classmethod
    def __get_pydantic_json_schema__(cls, core: CoreSchema, handler: GetJsonSchemaHandler) -> JsonSchemaValue:
        """Both accepted shapes, so the OpenAPI document shows the bare list too."""
        schema = handler.resolve_ref_schema(handler(core))
        return {"anyOf": [dict(schema), schema["properties"]["labels"]], "title": schema["title"],
                "description": schema.get("description", "")}


class RoutingBody(BaseModel):
    """Only `weights`: reweight the open rollout; `end`: end it; anything else opens a new rollout."""

    model_config = ConfigDict(extra="forbid")

    mode: Mode | None = None
    versions: dict[Text, VersionId | int] | None = Field(None, description="role -> version, with a 'champion' entry")
    weights: dict[str, Weight] | None = Field(None, description="role or version -> weight, summing to at most 1")
    salt: Text | None = Field(None, max_length=128)
    end: bool = False
    reason: Text | None = Field(None, max_length=500)

    @field_validator("versions")
    @classmethod
    def _has_champion(cls, versions: dict[str, str | int] | None) -> dict[str, str | int] | None:
        if versions is not None and Role.CHAMPION not in versions:
            raise PydanticCustomError("champion", "expected an object of role -> version with a 'champion' entry")
        return versions

    @field_validator("weights")
    @classmethod
    def _at_most_one(cls, weights: dict[str, float] | None) -> dict[str, float] | None:
        if weights is not None and sum(weights.values()) > 1.0 + 1e-9:
            raise PydanticCustomError("weights_sum", "must sum to at most 1, got {total}",
                                      {"total": f"{sum(weights.values()):.6g}"})
        return weights


async def add_labels(body: LabelsBody, limit: int, now: float, writer: LogWriter, store: OutcomeStore,
                     classes: int | None) -> dict[str, Any]:
    """Store the labels (a label for an unknown request is counted, not refused); `now` for those without `ts`.
    A classifier's label is its class: 0 or 1 for a binary one, 0..`classes`-1 for a multiclass one (any whole
    number from 0 when the champion does not say how many): anything else would be scored as a wrong answer.
    `classes` None: a regression, any number."""
    if len(body.labels) > limit:
        raise RequestError(413, f"labels: {len(body.labels)} rows, at most {limit} per request")
    if classes is not None:
        for i, item in enumerate(body.labels):
            value = item.label
            if not (float(value).is_integer() and value >= 0 and (classes <= 0 or value < classes)):
                allowed = "0 or 1" if classes == 2 else "a whole number from 0" if classes <= 0 else (
                    f"one of 0..{classes - 1}")
                raise RequestError(422, f"labels[{i}].label: a classifier's label is its class, {allowed}; got "
                                        f"{value:g}")
    rows = [(item.request_id, item.label, now if item.ts is None else item.ts) for item in body.labels]
    # Predictions are logged asynchronously: write them first so labels find their request.
    await writer.flush(timeout_s=5.0)
    report = await asyncio.to_thread(store.add_labels, rows)
    return {"stored": report.stored, "replaced": report.replaced, "unknown": report.unknown,
            "unknown_ids": list(report.unknown_ids)}


async def label_requests(budget: int, policy: Policy, writer: LogWriter, store: OutcomeStore) -> dict[str, Any]:
    """Draw a batch of label requests from the open rollout's rows logged since its last batch (each request
    is offered once, with its inclusion probability). Refused (409) when the policy does not weigh them: the
    ordinary evaluation would read labels favoured toward disagreements as a plain sample, and be biased."""
    if not policy.rollout.label_requests.enabled:
        raise RequestError(409, "rollout.label_requests.enabled is false: the evaluation reads every label as a "
                                "plain sample, so labels of proposed rows would bias it; enable it in the policy")
    rollout = await asyncio.to_thread(store.current_rollout)
    if rollout is None:
        raise RequestError(409, "label requests: no rollout is open, so there is no decision to label for")
    await writer.flush(timeout_s=5.0)  # predictions are logged asynchronously: the pool should hold them
    batch = await asyncio.to_thread(request_labels, store, rollout, policy, budget)
    return batch.to_dict()


async def set_routing(body: RoutingBody, store: OutcomeStore, aliases: Mapping[str, str], default_mode: str,
                      now: float, has_version: Callable[[str], bool], bandit_floor: float) -> None:
    """Change the routing row; the caller refreshes the service so the answer shows the new routing.
    Versions must exist in the registry; bandit weights give every arm at least the policy's floor."""
    for role, version in (body.versions or {}).items():
        try:
            known = await asyncio.to_thread(has_version, str(version))
        except Exception as exc:  # noqa: BLE001 - the registry cannot answer: the caller may retry
            raise RequestError(503, f"versions.{role}: the registry cannot say whether version {version} exists "
                                    f"({type(exc).__name__}); retry shortly", retry_after_s=5) from exc
        if not known:
            raise RequestError(422, f"versions.{role}: version {version} is not in the registry")
    current = await asyncio.to_thread(store.current_rollout)
    mode = body.mode or (current.mode if current is not None and body.versions is None else default_mode)
    if mode == "bandit" and body.weights is not None:
        for key, weight in body.weights.items():
            if weight < bandit_floor:
                raise RequestError(422, f"weights.{key}: a bandit arm gets at least the floor "
                                        f"(rollout.bandit.floor = {bandit_floor:g}), got {weight:g}")
    if body.end:
        if current is None:
            raise RequestError(409, "end: no rollout is open")
        await asyncio.to_thread(store.end_rollout, current.rollout_id, now, body.reason or "ended via PUT /routing")
        return
    if current is not None and body.versions is None and body.salt is None and body.mode in (None, current.mode):
        if body.weights is not None:
            await asyncio.to_thread(store.set_weights, current.rollout_id, body.weights)
        return
    versions = body.versions
    if versions is None:
        versions = {a: v for a, v in aliases.items() if a == Role.CHAMPION or is_challenger(a)}
        if Role.CHAMPION not in versions:
            raise RequestError(409, "versions: no @champion alias to route to; give versions explicitly")
    await asyncio.to_thread(store.open_rollout, body.mode or default_mode, {k: str(v) for k, v in versions.items()},
                            body.weights or {}, body.salt, now)


def routing_answer(view: RoutingView | None) -> dict[str, Any]:
    """The live routing (GET /routing, and the answer to PUT /routing)."""
    if view is None:
        return {"rollout_id": None, "mode": None, "arms": [], "shadows": [], "ready": False}
    return {**view.as_dict(), "ready": True}
