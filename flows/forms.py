"""What the Prefect UI's Run form shows for an optional override.

A pydantic `X | None` field becomes `anyOf: [X, null]` in the parameter schema, which the Run form draws as
a type switch that opens on "None" and reads 'Property is type "None"' (seen in headless Chromium,
docs/images/run-form.png). `Unset(schema)` gives the form the plain input of `schema` instead; a field left
empty is not sent, so the run gets None: the policy's value.
"""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Any, Literal, get_args

from pydantic import WithJsonSchema

from rollout.config import EstimatorName



def Unset(schema: dict[str, Any]) -> WithJsonSchema:  # noqa: N802 - reads as a type annotation
    return WithJsonSchema(schema)


Text = Annotated[str | None, Unset({"type": "string"})]
Number = Annotated[float | None, Unset({"type": "number"})]
Drift = Annotated[float | None, Unset({"type": "number", "minimum": 0, "maximum": 3})]
Integer = Annotated[int | None, Unset({"type": "integer"})]
Mapping = Annotated[dict[str, Any] | None, Unset({"type": "object"})]
Time = Annotated[datetime | None, Unset({"type": "string", "format": "date-time"})]
Estimator = Annotated[EstimatorName | None, Unset({"type": "string", "enum": list(get_args(EstimatorName))})]
TrainingData = Annotated[Literal["policy", "production", "both"] | None,
                         Unset({"type": "string", "enum": ["policy", "production", "both"]})]
