"""Flow `label-requests`: propose which of the open rollout's predictions to label, as a file (or rows of a table)
for the people who label (rollout.cd.label_requests). Their labels go back through POST /labels; the evaluation
weighs each by 1 / its inclusion probability (`rollout.label_requests.enabled`)."""

from __future__ import annotations

from typing import Any

from prefect import flow
from prefect.artifacts import create_markdown_artifact
from pydantic import BaseModel, Field

from flows import forms
from rollout.cd.label_requests import OUTPUT_SUFFIXES, request_labels, write, write_table
from rollout.config import ConfigError
from rollout.outcomes import OutcomeStore
from rollout.tables import SqlTable, destination
from tasks.common import artifact_key, load_policy_task


class LabelRequestParameters(BaseModel):
    """What a person sets in the Prefect UI's Run form."""

    budget: int = Field(description="How many predictions to propose for labelling (in expectation: each row is "
                        "drawn with its own probability).", ge=1, le=1_000_000)
    output: forms.Text = Field(None, description="Where the requests go (.csv or .parquet on the worker): "
                               "request_id, probability, unit_id, ts, segment, then the logged features.")
    output_table: forms.Text = Field(None, description="Or a table of `database` the requests are appended to "
                                     "(with rollout_id and batch): a labelling queue.")
    database: forms.Text = Field(None, description="Database URL for `output_table` (postgresql://user@host/db).")


@flow(name="label-requests", log_prints=True)
def label_requests(params: LabelRequestParameters, config: str = "rollout.yaml") -> dict[str, Any]:
    """Draw a batch of label requests from the rows the open rollout logged since the last batch, and write them.

    Args:
        params: The budget and the output file or table.
        config: Path of the policy file (rollout.yaml) on the worker, relative to its working directory.
    """
    # checked before drawing: a batch is offered once
    where = destination(params.output, params.output_table, params.database, "requests", "params.",
                        OUTPUT_SUFFIXES)
    policy = load_policy_task(config)
    if not policy.rollout.label_requests.enabled:
        raise ConfigError("rollout.label_requests.enabled is false: the evaluation would read labels favoured "
                          "toward disagreements as a plain sample; enable it in the policy first")
    store = OutcomeStore(policy.outcome_url)
    rollout = store.current_rollout()
    if rollout is None:
        print("No rollout is open: nothing to label for.")
        return {"requested": 0}
    batch = request_labels(store, rollout, policy, params.budget)
    path = write_table(batch, where) if isinstance(where, SqlTable) else write(batch, where)
    sentence = (f"{len(batch.requests):,} of {batch.pool:,} requests logged since the last batch proposed for "
                f"labelling (rollout {batch.rollout_id}, batch {batch.batch}) -> {path}")
    create_markdown_artifact(f"## Label requests\n\n{sentence}\n",
                             key=artifact_key(f"{policy.registry.model_name}-label-requests"),
                             description=f"{len(batch.requests):,} label requests")
    print(sentence)
    return {k: v for k, v in batch.to_dict().items() if k != "requests"} | {"output": str(path)}
