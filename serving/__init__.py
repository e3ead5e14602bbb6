"""The prediction service (FastAPI on uvicorn): `serving.app.create_app(policy, ...)` and `serving.app.run(policy, host, port)`.

Modules: app (endpoints, routing by rollout mode, shadow scoring), batching (adaptive micro-batching
in threads), models (loaded versions and their input contract), routing (sticky hashed / bandit
assignment), logwriter (bounded async prediction log), metrics (Prometheus text). See README.md.
"""
