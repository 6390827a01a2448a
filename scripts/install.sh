#!/usr/bin/env bash
# Idempotent virtual environment at .venv: built once per dependency set (a hash of pyproject.toml's dependency
# lists) in a cache outside the clone (SGLANG_FT_VENV_CACHE, default ~/.cache/sglang-ft/venvs) and linked here;
# a fresh machine builds it from nothing. The project itself is re-installed (editable, no deps) every time.
set -euo pipefail
cd "$(dirname "$0")/.."
PYTHON=${PYTHON:-python3}
key=$("$PYTHON" - <<'PY'
import hashlib, json, sys, tomllib
project = tomllib.load(open("pyproject.toml", "rb"))["project"]
deps = [project.get("requires-python"), project["dependencies"], project.get("optional-dependencies", {}), sys.version_info[:2]]
print(hashlib.sha256(json.dumps(deps, sort_keys=True).encode()).hexdigest()[:16])
PY
)
cache_root=${SGLANG_FT_VENV_CACHE:-$HOME/.cache/sglang-ft/venvs}
venv="$cache_root/$key"
if [ ! -f "$venv/.complete" ]; then
    echo "sglang-ft: building the virtual environment in $venv (sglang==0.5.23 and its torch: several minutes)"
    rm -rf "$venv"
    mkdir -p "$cache_root"
    "$PYTHON" -m venv "$venv"
    "$venv/bin/pip" install --quiet --upgrade pip
    "$venv/bin/pip" install --quiet -e ".[dev]"
    touch "$venv/.complete"
fi
if [ -e .venv ] && [ ! -L .venv ]; then
    echo "sglang-ft: .venv exists and is not a link to the cache; remove it to let make install manage it" >&2
    exit 1
fi
ln -sfn "$venv" .venv
# Point the (shared, cached) environment's editable install at this checkout.
.venv/bin/pip install --quiet --no-deps -e . >/dev/null
echo "sglang-ft: .venv -> $venv"
