"""The CD phase: `rollouts` (which versions a new rollout routes to), `evaluation` (the outcome store's sums
to `Evidence`, a `Decision` to registry and routing moves), `decision` (pure promotion rules)."""
