"""rollout: safe, boring ML model rollouts. This package is the domain, in plain Python: the CI phase (`ci`),
the CD phase (`cd`), the statistics (`stats`), the outcome store (`outcomes`), the model adapter (`models`),
the MLflow registry (`registry`), the policy file (`config`), data, reports, roles and times. Prefect flows
(`flows`, `tasks`), the service (`serving`) and the command line (`cli`) sit on top of it."""
