"""The statistics of promotion, pure and checked against their own simulations: `moments` (sufficient
statistics that add up), `sequential` (the anytime-valid mixture bound, O'Brien-Fleming spending, the A/B
difference), `guardrails` (segment floors, ceilings, stability, latency, sample ratio), `multiplicity`
(Bonferroni, Holm), `bandit` (Thompson sampling, inverse-propensity sums), `sampling` (known inclusion
probabilities, weighted means of label requests), `simulation` (the error rates)."""
