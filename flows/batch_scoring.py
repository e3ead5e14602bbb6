"""Flow `batch-scoring`: a file of rows scored by the champion and the open rollout's challengers, every
prediction logged as the service logs it (see serving/batch.py), so batch models roll out like served ones."""

from __future__ import annotations

from pathlib import Path
from typing import cast
from uuid import UUID

from prefect import flow, get_run_logger
from prefect.artifacts import create_markdown_artifact, create_progress_artifact, update_progress_artifact
from pydantic import BaseModel, Field

from flows import forms
from serving.batch import CHUNK_ROWS, BatchSummary, score_file, sink_of, source_of
from tasks.common import artifact_key, load_policy_task


class BatchParameters(BaseModel):
    """What a person sets in the Prefect UI's Run form."""

    input: forms.Text = Field(None, description="The rows to score: a .csv or .parquet file on the worker, or its "
                              "http(s) URL.")
    query: forms.Text = Field(None, description="Or the rows a SQL query returns from `database` (then `batch_id` "
                              "and `key_column` are needed).")
    database: forms.Text = Field(None, description="Database URL for `query` and `output_table` "
                                 "(postgresql://user@host/db).")
    output: forms.Text = Field(None, description="Where the answers go (.csv or .parquet): the input's columns, "
                               "then request_id, prediction, score, version, role, error.")
    output_table: forms.Text = Field(None, description="Or a table of `database` for the answers (replaced when the "
                                     "run completes).")
    batch_id: forms.Text = Field(None, description="Names the batch in the request ids (<batch id>:<key>); a "
                                 "rerun with the same id logs only what is not logged yet. Default: the input's "
                                 "file name.")
    key_column: forms.Text = Field(None, description="The column that identifies a row (an application id); "
                                   "default: the row's position in the input.")
    chunk_rows: int = Field(CHUNK_ROWS, ge=100, le=1_000_000, description="Rows read, scored and logged at a time.")


@flow(name="batch-scoring", log_prints=True)
def batch_scoring(params: BatchParameters, config: str = "rollout.yaml") -> BatchSummary:
    """Score a file, URL or query with the champion (the answers) and the open rollout's challengers, and log every
    prediction.

    Args:
        params: The input (file, URL or query) and output (file or table), the batch's id and key column.
        config: Path of the policy file (rollout.yaml) on the worker, relative to its working directory.
    """
    policy = load_policy_task(config)
    logger = get_run_logger()
    source = source_of(params.input, params.query, params.database)
    total = total_rows(source) if isinstance(source, Path) else None
    bar = cast(UUID, create_progress_artifact(0.0, description=f"batch scoring of {source}")) if total else None

    def progress(summary: BatchSummary) -> None:
        logger.info("%s rows scored, %s requests logged (%s already logged)", f"{summary.rows:,}",
                    f"{summary.logged:,}", f"{summary.already_logged:,}")
        if bar is not None and total:
            update_progress_artifact(bar, min(100.0, 100.0 * summary.rows / total))

    summary = score_file(policy, source, sink_of(params.output, params.output_table, params.database),
                         batch_id=params.batch_id, key_column=params.key_column, chunk_rows=params.chunk_rows,
                         on_chunk=progress)
    create_markdown_artifact(f"## Batch {summary.batch_id}\n\n{summary.sentence()}\n",
                             key=artifact_key(f"{policy.registry.model_name}-batch-scoring"),
                             description=f"{summary.rows:,} rows scored in {summary.mode} mode")
    print(summary.sentence())
    return summary


def total_rows(path: Path) -> int | None:
    """The input's row count when its format says it without reading it (Parquet), else None."""
    if path.suffix.lower() not in (".parquet", ".pq") or not path.exists():
        return None
    import pyarrow.parquet as pq

    return int(pq.ParquetFile(path).metadata.num_rows)

