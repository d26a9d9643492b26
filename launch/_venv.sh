# Sourced by the launch scripts: REPO, and PY from VENV (default: the repo's .venv; relative paths are
# taken relative to the repo). Stops with a hint when there is no interpreter.
REPO=$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)
VENV=${VENV:-$REPO/.venv}
case "$VENV" in /*) ;; *) VENV="$REPO/$VENV" ;; esac
PY="$VENV/bin/python"
if [ ! -x "$PY" ]; then
  echo "$0: no python at $PY: run launch/setup.sh or set VENV" >&2
  exit 2
fi
