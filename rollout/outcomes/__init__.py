"""The outcome store: every prediction the service made, the labels that came later, the routing of each
rollout and the audit log of every decision, in SQL (SQLite by default, PostgreSQL by URL).

`schema` defines the tables; `engine` makes connections and holds the evaluation lock; `log` writes
predictions and labels; `audit` keeps routing rows and decisions; `summaries` keeps the hourly sums an
evaluation reads in one call (`OutcomeStore.evidence`); `requests` keeps label-request batches; `store` puts them behind one object and the
`Store` protocol; `memory` is an in-memory fake for unit tests.
"""

from rollout.outcomes.audit import AuditEntry, Rollout, StoredPlan
from rollout.outcomes.engine import LockHeld
from rollout.outcomes.log import LabelReport, PredictionRow
from rollout.outcomes.store import OutcomeStore, Store
from rollout.outcomes.summaries import EvidenceSums, TrafficCounts

__all__ = ["AuditEntry", "EvidenceSums", "LabelReport", "LockHeld", "OutcomeStore", "PredictionRow", "Rollout",
           "Store", "StoredPlan", "TrafficCounts"]
