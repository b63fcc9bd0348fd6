#!/usr/bin/env bash
# perf_analyzer against a running Triton server over gRPC, with requests built from real user ids.
#
#   loadtest/perf_analyzer.sh --url 127.0.0.1:8001 --users-from work/artifacts/onnx/user_features.npz \
#       --csv work/perf_recommend.csv [--model recommend] [--concurrency 1:8:2] [--interval 5000] [-- EXTRA...]
#
# Every flag also reads an environment variable (RECSERVE_URL, RECSERVE_USERS_FROM, RECSERVE_USER_IDS_FILE,
# PERF_MODEL, PERF_CONCURRENCY, PERF_INTERVAL_MS, PERF_CSV, RECSERVE_K); arguments after `--` go to
# perf_analyzer unchanged. PERF_ANALYZER names the binary (default: the one next to $PYTHON), PYTHON the
# interpreter of the project's environment (default: .venv/bin/python, else python3).
#
# perf_analyzer (tritonclient 2.50's build) needs libb64.so.0d (Debian package libb64-0d) and
# libcudart.so.12 (pip package nvidia-cuda-runtime-cu12); this script puts the latter on LD_LIBRARY_PATH.
set -euo pipefail

die() { echo "perf_analyzer.sh: $*" >&2; exit 2; }

ROOT="$(cd "$(dirname "${BASH_SOURCE[0]}")/.." && pwd)"
URL="${RECSERVE_URL:-127.0.0.1:8001}"
MODEL="${PERF_MODEL:-recommend}"
CONCURRENCY="${PERF_CONCURRENCY:-1:8:2}"
INTERVAL_MS="${PERF_INTERVAL_MS:-5000}"
CSV="${PERF_CSV:-}"
USERS_FROM="${RECSERVE_USERS_FROM:-}"
USER_IDS_FILE="${RECSERVE_USER_IDS_FILE:-}"
K="${RECSERVE_K:-10}"
INPUT_JSON=""
EXTRA=()

usage() { sed -n '2,13p' "${BASH_SOURCE[0]}" | sed 's/^# \{0,1\}//'; }

while [[ $# -gt 0 ]]; do
  case "$1" in
    -u|--url) URL="$2"; shift 2 ;;
    -m|--model) MODEL="$2"; shift 2 ;;
    -c|--concurrency) CONCURRENCY="$2"; shift 2 ;;
    -p|--interval) INTERVAL_MS="$2"; shift 2 ;;
    -f|--csv) CSV="$2"; shift 2 ;;
    --users-from) USERS_FROM="$2"; shift 2 ;;
    --user-ids-file) USER_IDS_FILE="$2"; shift 2 ;;
    -k|--k) K="$2"; shift 2 ;;
    --input-json) INPUT_JSON="$2"; shift 2 ;;
    -h|--help) usage; exit 0 ;;
    --) shift; EXTRA=("$@"); break ;;
    *) die "unknown argument '$1' (see --help; perf_analyzer's own flags go after --)" ;;
  esac
done

case "$URL" in 127.0.0.1:*|localhost:*|\[::1\]:*) ;; *) die "--url $URL: only a local server (127.0.0.1:PORT) is measured" ;; esac

if [[ -z "${PYTHON:-}" ]]; then
  if [[ -x "$ROOT/.venv/bin/python" ]]; then PYTHON="$ROOT/.venv/bin/python"; else PYTHON="$(command -v python3)"; fi
fi
PA="${PERF_ANALYZER:-$(dirname "$PYTHON")/perf_analyzer}"
[[ -x "$PA" ]] || PA="$(command -v perf_analyzer || true)"
[[ -n "$PA" && -x "$PA" ]] || die "no perf_analyzer binary: pip install 'tritonclient[all]==2.50.0' or set PERF_ANALYZER"

# nvidia.cuda_runtime is a namespace package (no __file__): its lib dir comes from __path__.
CUDART_LIB="$("$PYTHON" -c 'import os, nvidia.cuda_runtime as m; print(os.path.join(list(m.__path__)[0], "lib"))' 2>/dev/null || true)"
[[ -n "$CUDART_LIB" && -e "$CUDART_LIB/libcudart.so.12" ]] \
  || die "libcudart.so.12 not found: pip install nvidia-cuda-runtime-cu12 (into the environment of $PYTHON)"
export LD_LIBRARY_PATH="$CUDART_LIB${LD_LIBRARY_PATH:+:$LD_LIBRARY_PATH}"

if ! { ldconfig -p 2>/dev/null | grep -q 'libb64\.so\.0d'; } && ! ldd "$PA" 2>/dev/null | grep -q 'libb64\.so\.0d => /'; then
  die "libb64.so.0d not found: apt-get install -y libb64-0d"
fi
if MISSING="$(ldd "$PA" 2>&1 | grep -E 'not found' | head -n 1)"; [[ -n "$MISSING" ]]; then
  if [[ "$MISSING" == *GLIBC* ]]; then
    die "$PA needs a newer glibc ($(echo "$MISSING" | grep -oE "GLIBC[A-Z]*_[0-9.]+" | head -n 1)); use tritonclient 2.50's perf_analyzer (PERF_ANALYZER=...)"
  fi
  die "$PA cannot load a library: $(echo "$MISSING" | xargs)"
fi

[[ -n "$CSV" ]] || die "--csv PATH is required (perf_analyzer's -f output)"
mkdir -p "$(dirname "$CSV")"

INPUT_ARGS=()
if [[ -n "$INPUT_JSON" ]]; then
  INPUT_ARGS=(--input-data "$INPUT_JSON")
elif [[ "$MODEL" == recommend || "$MODEL" == retrieval ]]; then
  [[ -n "$USERS_FROM" || -n "$USER_IDS_FILE" ]] \
    || die "--users-from ARTIFACTS/onnx/user_features.npz (or --user-ids-file) is required for model $MODEL"
  INPUT_JSON="$(dirname "$CSV")/$(basename "$CSV" .csv).input.json"
  SOURCE=(--users-from "$USERS_FROM"); [[ -n "$USERS_FROM" ]] || SOURCE=(--user-ids-file "$USER_IDS_FILE")
  "$PYTHON" "$ROOT/loadtest/make_perf_input.py" "${SOURCE[@]}" --model "$MODEL" --k "$K" --out "$INPUT_JSON"
  INPUT_ARGS=(--input-data "$INPUT_JSON")
else
  echo "perf_analyzer.sh: no realistic data for model $MODEL; using --input-data random" >&2
  INPUT_ARGS=(--input-data random)
fi

set -x
"$PA" -m "$MODEL" -u "$URL" -i grpc "${INPUT_ARGS[@]}" \
  --concurrency-range "$CONCURRENCY" --measurement-interval "$INTERVAL_MS" \
  -f "$CSV" "${EXTRA[@]}"
