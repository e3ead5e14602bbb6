"""The CI phase, one module per step: `validation` (Great Expectations suites, drift), `training` (pipelines,
cross-validation, thread caps), `gates` (pure verdicts with reasons in words), `robustness` (edge cases),
`stress` (latency against the champion)."""
