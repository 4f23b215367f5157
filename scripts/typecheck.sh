#!/usr/bin/env bash
# mypy on afd-dispatch as installed. `kernels/` and `integrations/` become
# afd_dispatch.kernels and afd_dispatch.integrations only in an install (pyproject's
# package-dir), and mypy cannot see through an editable install's import hook: checked in
# place, every import of them would be Any. Paths in the output are the repository's.
set -euo pipefail
cd "$(dirname "$0")/.."
venv="$PWD/${VENV:-.venv}"
site=build/typecheck
# setuptools copies into build/lib.* and never deletes there: a module removed from the
# sources would still be installed from an earlier build
rm -rf "$site" build/lib.*
"$venv/bin/python" -m pip install -q --disable-pip-version-check --no-deps \
  --no-build-isolation --no-compile --target "$site" .
cd "$site"
MYPYPATH="$PWD" "$venv/bin/mypy" --config-file ../../pyproject.toml \
  --cache-dir ../../.mypy_cache -p afd_dispatch \
  | sed -e 's#^afd_dispatch/kernels/#kernels/#' -e 's#^afd_dispatch/integrations/#integrations/#'
