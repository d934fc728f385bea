# Sourced by the launch scripts: `choose_python` sets PYTHON to the interpreter of the active environment, the one
# that has stmem's dependencies, instead of whatever `python3` comes first on PATH (a virtual environment's packages
# are invisible to the system python3: "No module named 'absl'").
#
# Order: $PYTHON if set (it must work); $VIRTUAL_ENV/bin/python; $CONDA_PREFIX/bin/python; `python`, then `python3`
# on PATH. The first that can import stmem, absl and jax (looked up, not imported: this takes milliseconds) wins.
# None: exit 2 with a message saying how to choose one.
_can_run_stmem() {
  "$1" -c 'import importlib.util as u, sys; sys.exit(not all(u.find_spec(m) for m in ("stmem", "absl", "jax")))' \
    2>/dev/null
}

choose_python() {
  if [[ -n "${PYTHON:-}" ]]; then
    if ! _can_run_stmem "$PYTHON"; then
      echo "$(basename "$0"): PYTHON=$PYTHON cannot import stmem (or absl, jax); set PYTHON to the python of the" \
           "environment where stmem is installed, e.g. PYTHON=~/venvs/stmem/bin/python" >&2
      exit 2
    fi
    return 0
  fi
  local tried=() candidate
  for candidate in "${VIRTUAL_ENV:+$VIRTUAL_ENV/bin/python}" "${CONDA_PREFIX:+$CONDA_PREFIX/bin/python}" \
                   "$(command -v python 2>/dev/null || true)" "$(command -v python3 2>/dev/null || true)"; do
    [[ -n "$candidate" && -x "$candidate" ]] || continue
    tried+=("$candidate")
    if _can_run_stmem "$candidate"; then
      PYTHON="$candidate"
      return 0
    fi
  done
  echo "$(basename "$0"): no python here can import stmem (tried: ${tried[*]:-none}); activate the environment" \
       "where stmem is installed, or set PYTHON=/path/to/that/env/bin/python" >&2
  exit 2
}
