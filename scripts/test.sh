#!/usr/bin/env bash
# The whole suite: lint, types, then unit, interop and end-to-end tests with real clients.
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/ruff check virtua tests bench
.venv/bin/mypy virtua
exec .venv/bin/pytest -q -p no:cacheprovider "$@" tests
