#!/usr/bin/env bash
# The test suite (CPU, offline). Extra arguments go to pytest, e.g. ./test.sh -k config
TRISTAGE_EXTRAS=dev source "$(dirname "$0")/scripts/env.sh"
ruff check train data demo tests bench tristage scripts
exec python -m pytest -q "$@"
