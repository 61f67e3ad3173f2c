#!/usr/bin/env bash
# Main job placeholder; replaced when the IS2RE model lands (issue 4).
set -euo pipefail
cd "$(dirname "$0")/.."
.venv/bin/flt-mol --help
