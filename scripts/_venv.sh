# Sourced by scripts/test and scripts/up: makes sure .venv exists and holds this
# checkout installed in editable mode with the dev tools. Reinstalls only when
# pyproject.toml changed since the last install (a hash in .venv/.tidemq-installed).
# Run from the repository root.

ensure_venv() {
    local python="${PYTHON:-python3}"
    if [ ! -x .venv/bin/python ]; then
        echo "creating .venv with $("$python" --version 2>&1)" >&2
        "$python" -m venv .venv
    fi
    local stamp=.venv/.tidemq-installed
    local want
    want="$(.venv/bin/python -c 'import hashlib,sys; print(hashlib.sha256(open("pyproject.toml","rb").read()).hexdigest())')"
    if [ ! -f "$stamp" ] || [ "$(cat "$stamp")" != "$want" ] || [ ! -x .venv/bin/tide ]; then
        echo "installing tidemq and its dev tools into .venv" >&2
        .venv/bin/python -m pip install --quiet -e '.[dev]'
        echo "$want" > "$stamp"
    fi
}
