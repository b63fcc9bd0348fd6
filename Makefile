# Two commands for a new user: `make demo` and `make test`. Both build .venv first.
PY      ?= python3
VENV    := .venv
BIN     := $(VENV)/bin
STAMP   := $(VENV)/.installed
WORK    ?= work
DEMO_DATA ?= $(WORK)/synth
ARTIFACTS ?= $(WORK)/artifacts
REPOSITORY ?= model_repository
# Ports for the demo server; integration tests pick free ports of their own.
HTTP_PORT ?= 8000
GRPC_PORT ?= 8001
METRICS_PORT ?= 8002

.PHONY: venv demo test unit lint bench bench-serving perf locust ml100k clean

venv: $(STAMP)

$(STAMP): pyproject.toml Makefile
	$(PY) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	# CPU torch first, so nothing later pulls the CUDA build.
	$(BIN)/pip install -q torch==2.13.0
	$(BIN)/pip install -q -e ".[dev,loadtest]"
	@# perf_analyzer (from tritonclient) needs libb64; install it when we may.
	@if ! ldconfig -p | grep -q libb64.so.0d; then \
	  (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	   (apt-get install -y -qq libb64-0d >/dev/null 2>&1 || (apt-get update -qq >/dev/null && apt-get install -y -qq libb64-0d >/dev/null)) ) \
	   || echo "note: libb64-0d not installed; perf_analyzer will not run (apt-get install libb64-0d)"; fi
	@# bench-serving drives HTTP with wrk (a C load generator); install it the same way.
	@if ! command -v wrk >/dev/null; then \
	  (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	   (apt-get install -y -qq wrk >/dev/null 2>&1 || (apt-get update -qq >/dev/null && apt-get install -y -qq wrk >/dev/null)) ) \
	   || echo "note: wrk not installed; make bench-serving will not run (apt-get install wrk)"; fi
	@# The front door of `recserve serve` (recserve/serving/frontdoor.py): nginx with its Lua module and cjson.
	@if ! [ -f /usr/lib/nginx/modules/ngx_http_lua_module.so ] || ! command -v nginx >/dev/null || ! command -v lua5.1 >/dev/null; then \
	  (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	   (apt-get install -y -qq nginx-light libnginx-mod-http-lua lua-cjson lua5.1 >/dev/null 2>&1 || (apt-get update -qq >/dev/null && apt-get install -y -qq nginx-light libnginx-mod-http-lua lua-cjson lua5.1 >/dev/null)) ) \
	   || echo "note: nginx with the Lua module not installed; recserve serve needs it (apt-get install nginx-light libnginx-mod-http-lua lua-cjson) or --no-front-door"; fi
	@# tests/unit/test_deploy.py checks the Prometheus rules and config with promtool (Debian package prometheus).
	@if ! command -v promtool >/dev/null; then \
	  (command -v apt-get >/dev/null && [ "$$(id -u)" = 0 ] && \
	   (apt-get install -y -qq --no-install-recommends prometheus >/dev/null 2>&1 || (apt-get update -qq >/dev/null && apt-get install -y -qq --no-install-recommends prometheus >/dev/null)) ) \
	   || echo "note: promtool not installed; the Prometheus checks of tests/unit/test_deploy.py will skip (apt-get install prometheus)"; fi
	touch $(STAMP)

demo: venv
	$(BIN)/recserve demo --work $(WORK) --repository $(REPOSITORY) \
	  --http-port $(HTTP_PORT) --grpc-port $(GRPC_PORT) --metrics-port $(METRICS_PORT)

# The whole suite takes about 3 minutes here; `timeout` ends it (with a failure) should anything ever hang.
test: venv
	timeout -k 30 1800 $(BIN)/python -m pytest -q tests

unit: venv
	$(BIN)/python -m pytest -q tests/unit

lint: venv
	$(BIN)/ruff check recserve tests loadtest

bench: venv
	$(BIN)/recserve bench int8 --artifacts $(ARTIFACTS)

# Serving benchmark: Triton (ensemble over gRPC with perf_analyzer, over HTTP with wrk, the client pipeline)
# and the FastAPI + ONNX Runtime baseline (wrk), FP32 and, when INT8_REPOSITORY exists, INT8; one at a time,
# each on its own free 127.0.0.1 ports. Write the repositories first (`recserve export repository`).
INT8_REPOSITORY ?= $(REPOSITORY)_int8
BENCH_DURATION ?= 10
BENCH_CONCURRENCY ?= 1,8,32
bench-serving: venv
	$(BIN)/python loadtest/bench_serving.py --repository $(REPOSITORY) \
	  $(if $(wildcard $(INT8_REPOSITORY)/manifest.json),--int8-repository $(INT8_REPOSITORY)) \
	  --duration $(BENCH_DURATION) --concurrency $(BENCH_CONCURRENCY) \
	  --json $(WORK)/bench_serving.json --plot $(WORK)/bench_serving.png

# These two need a running server: `$(BIN)/recserve serve --repository $(REPOSITORY)` in another shell.
perf: venv
	loadtest/perf_analyzer.sh --url 127.0.0.1:$(GRPC_PORT) --users-from $(ARTIFACTS)/onnx/user_features.npz \
	  --csv $(WORK)/perf_recommend.csv

locust: venv
	$(BIN)/locust -f loadtest/locustfile.py --headless -u 16 -r 4 -t 30s --host 127.0.0.1:$(GRPC_PORT) \
	  --protocol grpc --users-from $(ARTIFACTS)/onnx/user_features.npz --csv $(WORK)/locust

# The README's MovieLens-100K figures (needs ../shared/datasets/ml-100k or ML100K=DIR).
ML100K ?= ../shared/datasets/ml-100k
ml100k: venv
	$(BIN)/recserve train --data $(ML100K) --out $(WORK)/ml100k
	$(BIN)/recserve evaluate --artifacts $(WORK)/ml100k

clean:
	rm -rf $(WORK) $(VENV)
