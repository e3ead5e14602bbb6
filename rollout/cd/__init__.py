"""The CD phase: `rollouts` (which versions a new rollout routes to), `evaluation` (the outcome store's sums
to `Evidence`, a `Decision` to registry and routing moves), `decision` (pure promotion rules),
`label_requests` (which predictions to ask labels for, and what their weighted labels say)."""
