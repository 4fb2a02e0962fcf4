#!/usr/bin/env bash
# Compatibility check: the test suite in a fresh venv per "leg" (a set of pinned dependency versions).
#
#   scripts/compat.sh [--build-only] LEG...      LEG: gpu-machine oldest newest transformers-oldest transformers-newest
#
# Each leg's venv is built once under .compat/<leg> (rebuilt only when its pins change). Each run then clones the
# HEAD of $COMPAT_SRC (default: this repository) into /tmp/compat-src-<leg>, installs that clone's dependencies
# (pyproject's [project.dependencies] and the `test` extra) under the leg's pip constraints file, installs the clone
# itself editable without dependencies, records `pip check` and `pip freeze`, and runs the whole suite
# (`python -m pytest -q -p no:cacheprovider`, no -x: every failure is listed) under `nice` and `timeout` (SIGINT
# first, so that a leg cut short still prints the failures it met and its counts so far).
# Legs run one at a time (a lock), in the order given. Logs: .compat/logs/<leg>.{build,run}.log and <leg>.freeze.txt.
# The table of every leg run so far (.compat/results/<leg>.tsv) is printed and written into docs/compat.md between
# the compat markers.
#
# Environment: COMPAT_SRC (a git repository; its HEAD is tested), COMPAT_DIR (default .compat), COMPAT_PYTHON
# (default python3), COMPAT_TIMEOUT (per leg run, default 45m: a 5-minute suite took 10-25 minutes at nice 10
# beside other work), COMPAT_NICE (default 10).
set -euo pipefail

ROOT=$(cd "$(dirname "$0")/.." && pwd)
COMPAT_DIR=${COMPAT_DIR:-$ROOT/.compat}
SRC_REPO=${COMPAT_SRC:-$ROOT}
PYTHON=${COMPAT_PYTHON:-python3}
LEG_TIMEOUT=${COMPAT_TIMEOUT:-45m}
NICE=${COMPAT_NICE:-10}
LOGS=$COMPAT_DIR/logs
RESULTS=$COMPAT_DIR/results
DOC=$ROOT/docs/compat.md
ALL_LEGS="gpu-machine newest transformers-oldest transformers-newest oldest"
KEY_PACKAGES="torch transformers tokenizers huggingface-hub safetensors bitsandbytes datasets rich typer click numpy"

# pins LEG: the leg's pip constraints, one per line. Packages not named resolve to the newest release pip can
# co-install. torch==2.13.0+cpu is the CPU build on this machine's disk; 2.11.0 and 2.4.0 are PyPI's CUDA builds,
# which run on a CPU too.
pins() {
    case $1 in
        gpu-machine)  # what the GPU machine has installed (issue 23)
            printf '%s\n' torch==2.11.0 transformers==5.17.0 tokenizers==0.23.2 huggingface-hub==1.33.0 \
                safetensors==0.8.0 bitsandbytes==0.50.2 ;;
        oldest)
            # pyproject's lower bounds. They were raised to what passed: transformers 4.56.0 failed 4 tests (see
            # docs/compat.md), and this set is what the gpu-machine leg resolved to (datasets, rich, typer included).
            printf '%s\n' torch==2.11.0 transformers==5.17.0 datasets==5.2.0 tokenizers==0.23.2 \
                huggingface-hub==1.33.0 safetensors==0.8.0 bitsandbytes==0.50.2 rich==15.0.0 typer==0.29.2 ;;
        newest)  # torch 2.14.1 is the newest this machine can install (/etc/xdg/pip caps it); the rest unpinned
            printf '%s\n' torch==2.14.1 ;;
        transformers-oldest) printf '%s\n' torch==2.13.0+cpu transformers==5.17.0 ;;
        transformers-newest) printf '%s\n' torch==2.13.0+cpu ;;
        *) echo "compat.sh: unknown leg '$1' (legs: $ALL_LEGS)" >&2; return 2 ;;
    esac
}

# lifted LEG: packages whose pyproject range this leg replaces by its pin (to test past a declared cap).
lifted() {
    case $1 in
        *) echo ;;
    esac
}

# requirements SRC LEG OUT: pyproject's dependencies and test extra, the lifted ones without their range.
requirements() {
    "$PYTHON" - "$1/pyproject.toml" "$(lifted "$2")" > "$3" <<'PY'
import re, sys, tomllib
project = tomllib.load(open(sys.argv[1], "rb"))["project"]
lifted = set(sys.argv[2].split())
for requirement in project["dependencies"] + project["optional-dependencies"]["test"]:
    name = re.match(r"[A-Za-z0-9_.-]+", requirement).group(0)
    print(name if name.lower() in lifted else requirement)
PY
}

fresh_clone() {  # fresh_clone LEG -> prints the clone's path
    local src=/tmp/compat-src-$1
    rm -rf "$src"
    git clone -q "$SRC_REPO" "$src"
    echo "$src"
}

build() {  # build LEG: the venv with every dependency at the leg's pins, once per set of pins
    local leg=$1 venv=$COMPAT_DIR/$1 log=$LOGS/$1.build.log
    local cons=$COMPAT_DIR/$leg.constraints.txt
    pins "$leg" > "$cons.new"
    if [[ -f $venv/.built ]] && cmp -s "$cons.new" "$venv/.built"; then rm "$cons.new"; return 0; fi
    mv "$cons.new" "$cons"
    echo "== building $leg ($(tr '\n' ' ' < "$cons"))" >&2
    local src; src=$(fresh_clone "$leg")
    rm -rf "$venv"
    {
        "$PYTHON" -m venv "$venv" &&
        "$venv/bin/pip" install -q -U pip &&
        requirements "$src" "$leg" "$COMPAT_DIR/$leg.requirements.txt" &&
        nice -n "$NICE" "$venv/bin/pip" install -c "$cons" -r "$COMPAT_DIR/$leg.requirements.txt" "hatchling>=1.21" editables
    } > "$log" 2>&1 || { echo "== $leg: install failed, see $log" >&2; tail -5 "$log" >&2; return 1; }
    cp "$cons" "$venv/.built"
}

version_of() { "$1/bin/python" -c "import importlib.metadata as m, sys
try: print(m.version(sys.argv[1]))
except m.PackageNotFoundError: print('-')" "$2"; }

run() {  # run LEG: the suite from a fresh clone of the source's HEAD; one row in results/LEG.tsv
    local leg=$1 venv=$COMPAT_DIR/$1 log=$LOGS/$1.run.log cons=$COMPAT_DIR/$1.constraints.txt
    local src; src=$(fresh_clone "$leg")
    local commit; commit=$(git -C "$src" rev-parse --short HEAD)
    echo "== running $leg at $commit ($(git -C "$src" log -1 --format=%s | cut -c1-70))" >&2
    local status=ok
    {
        echo "# leg $leg, commit $(git -C "$src" log -1 --oneline)" &&
        requirements "$src" "$leg" "$COMPAT_DIR/$leg.requirements.txt" &&
            # a no-op unless this HEAD's pyproject asks for something the venv lacks
        nice -n "$NICE" "$venv/bin/pip" install -q -c "$cons" -r "$COMPAT_DIR/$leg.requirements.txt" "hatchling>=1.21" editables &&
        "$venv/bin/pip" install -q --no-deps --no-build-isolation -e "$src"
    } > "$log" 2>&1 || status="install failed"
    {
        echo "# pip check"; "$venv/bin/pip" check || true
        "$venv/bin/pip" freeze
    } > "$LOGS/$leg.freeze.txt" 2>&1
    local start end rc=0
    start=$(date +%s)
    if [[ $status == ok ]]; then
        ( cd "$src" && nice -n "$NICE" timeout -s INT -k 2m "$LEG_TIMEOUT" \
                "$venv/bin/python" -m pytest -q -p no:cacheprovider -rfEs --durations=10 ) \
            >> "$log" 2>&1 || rc=$?
    fi
    end=$(date +%s)
    local summary; summary=$(grep -E '^(=+ )?[0-9]+ (passed|failed|errors?|skipped|deselected)|no tests ran' "$log" | tail -1 || true)
    count() { local n; n=$(grep -oE "[0-9]+ $1" <<< "$summary" | grep -oE '^[0-9]+' || true); echo "${n:-0}"; }
    local errors; errors=$(count 'errors?\b')
    if [[ $status == ok ]]; then
        case $rc in
            0) status=pass ;;
            1) status=fail ;;
            124) status="timed out ($LEG_TIMEOUT)" ;;
            *) status="pytest rc $rc" ;;
        esac
    fi
    local versions="" p
    for p in $KEY_PACKAGES; do versions+="$(version_of "$venv" "$p")"$'\t'; done
    mkdir -p "$RESULTS"
    printf '%s\t%s\t%s%s\t%s\t%s\t%s\t%s\t%s\t%s\n' "$leg" "$("$venv/bin/python" -c 'import platform; print(platform.python_version())')" \
        "$versions" "$(count passed)" "$(count failed)" "$errors" "$(count skipped)" "$((end - start))" "$status" \
        "$commit $(date -u +%F)" > "$RESULTS/$leg.tsv"
    echo "== $leg: ${summary:-$status} ($((end - start)) s)" >&2
}

table() {  # the markdown table of every leg with a result, in the canonical order
    echo "| leg | python | torch | transformers | tokenizers | hub | safetensors | bitsandbytes | datasets | rich | typer | click | numpy | passed | failed | errors | skipped | wall | status | tested |"
    echo "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"
    local leg
    for leg in $ALL_LEGS; do
        [[ -f $RESULTS/$leg.tsv ]] || continue
        awk -F'\t' '{ w = $18; printf "| %s", $1; for (i = 2; i <= 17; i++) printf " | %s", $i;
                      printf " | %dm%02ds | %s | %s |\n", w / 60, w % 60, $19, $20 }' "$RESULTS/$leg.tsv"
    done
}

write_doc() {
    local tab; tab=$(table)
    echo "$tab"
    [[ -f $DOC ]] || printf '# Compatibility\n\n<!-- compat:begin -->\n<!-- compat:end -->\n' > "$DOC"
    TABLE="$tab" "$PYTHON" - "$DOC" <<'PY'
import os, re, sys
path = sys.argv[1]
text = open(path).read()
block = ("<!-- compat:begin (generated by scripts/compat.sh: edits here are overwritten) -->\n"
         + os.environ["TABLE"] + "\n<!-- compat:end -->")
text, n = re.subn(r"<!-- compat:begin.*?<!-- compat:end -->", lambda _: block, text, flags=re.S)
if not n:
    text = text.rstrip("\n") + "\n\n" + block + "\n"
open(path, "w").write(text)
PY
}

main() {
    local build_only=0 legs=() leg failed=0
    for arg in "$@"; do
        case $arg in
            --build-only) build_only=1 ;;
            -h|--help) awk 'NR > 1 && !/^#/ { exit } NR > 1 { sub(/^# ?/, ""); print }' "$0"; return 0 ;;
            *) pins "$arg" > /dev/null; legs+=("$arg") ;;
        esac
    done
    (( ${#legs[@]} )) || { echo "usage: scripts/compat.sh [--build-only] LEG... (legs: $ALL_LEGS)" >&2; return 2; }
    mkdir -p "$LOGS" "$RESULTS"
    for leg in "${legs[@]}"; do
        if (( build_only )); then
            build "$leg" || failed=1
            continue
        fi
        # one leg at a time, whoever started it: the suite needs the whole machine
        if ! ( flock 9; build "$leg" && run "$leg" ) 9> "$COMPAT_DIR/.lock"; then
            failed=1
            [[ -f $RESULTS/$leg.tsv ]] || printf '%s\t-\t%s0\t0\t0\t0\t0\tinstall failed\t-\n' "$leg" \
                "$(printf -- '-\t%.0s' $KEY_PACKAGES)" > "$RESULTS/$leg.tsv"
        fi
    done
    (( build_only )) || write_doc
    return $failed
}

main "$@"
