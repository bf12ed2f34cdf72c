#!/usr/bin/env bash
# The offline demo: synthetic data -> cache -> stages 1-3 -> exports -> adherence report.
# Usage: ./demo.sh [OUT_DIR]   (default demo_out)
source "$(dirname "$0")/scripts/env.sh"
exec tristage demo --out "${1:-demo_out}"
