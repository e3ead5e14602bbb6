"""The prediction service (FastAPI on uvicorn): `serving.app.create_app(policy, ...)` and `serving.app.run(policy, host, port)`.

Modules: app (the service's lifecycle and the app), loading (models, lanes and routing as one snapshot),
predict (the predict path), admin (labels and routing), http (endpoints, token, errors, body bound),
fastpath (POST /predict straight from ASGI), batching (adaptive micro-batching in threads), isolation
(shadow models in child processes), routing (sticky hashed / bandit assignment), logwriter (bounded async
prediction log), metrics (Prometheus text), errors (the client error). See README.md.
"""
