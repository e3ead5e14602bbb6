"""The reliability suite uses the serving tests' fakes and fixtures."""

from tests.serving.conftest import anyio_backend, registry, store, token  # noqa: F401 - fixtures by name
