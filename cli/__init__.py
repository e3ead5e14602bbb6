"""The `rollout` command and what drives the service from outside: `main` (typer/rich), `demo` (`make demo`),
`simulate` (realistic traffic and delayed labels over HTTP). Only the console script imports this package."""
