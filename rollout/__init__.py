"""rollout: safe, boring ML model rollouts as Prefect workflows."""

