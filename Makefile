# The verbs people type. Two of them set up everything on a fresh machine:
#   make run    the main job: a local control plane (or your cluster), the operator,
#               a sample ChatService and the chat service with embedded defaults
#   make test   every test, including the ones against a real kube-apiserver
SHELL := /usr/bin/env bash
.SHELLFLAGS := -eu -o pipefail -c
CARGO ?= cargo

.PHONY: all build run test unit-test lint deny fmt crds crds-check k8s-bins status-check prom-tools monitoring-check postgres cluster bench bench-operator e2e fuzz image image-push clean help

all: build

help: ## list the targets
	@grep -E '^[a-z-]+:.*## ' $(MAKEFILE_LIST) | awk -F':.*## ' '{printf "  %-16s %s\n", $$1, $$2}'

build: ## build every binary (release)
	$(CARGO) build --release --workspace --bins

k8s-bins: ## build the Kubernetes binaries into the cache (first run only)
	hack/k8s-bins.sh >/dev/null

postgres: ## find (or install) PostgreSQL's server binaries for the tests
	hack/postgres.sh >/dev/null

status-check: ## build chatgate-status (kstatus + Argo CD's Lua runner) into the cache
	hack/status-check.sh >/dev/null

prom-tools: ## build promtool, prometheus and chatgate-dashlint (hack/prom-tools) into the cache
	hack/prom-tools.sh >/dev/null

monitoring-check: prom-tools k8s-bins ## the alerts' unit tests, the dashboard's lint and queries, the chart's monitoring objects
	$(CARGO) test --workspace --test monitoring

run: k8s-bins postgres ## the local platform (or current cluster) + operator + a sample ChatService whose pods run for real
	hack/run.sh

cluster: k8s-bins postgres ## the local platform: control plane, a node running pods as processes, PostgreSQL (Ctrl-C stops it)
	$(CARGO) build --quiet --release -p chatgate-service -p chatgate-operator -p chatgate-tests --bins
	target/release/chatgate-cluster --nodes 0 --run-pods --postgres

test: k8s-bins status-check prom-tools postgres lint ## all tests: unit, service, real control plane, CLI, the rollout proof
	$(CARGO) test --workspace --no-fail-fast
	@cat target/e2e/rollout.md

# unit-test runs every test that needs neither a control plane nor PostgreSQL, on
# loopback only:
#   - every crate's unit tests (--lib --bins) and doctests (--doc);
#   - operator/tests/* (render_cli, validate_cli, fuzz_corpus): the operator binary's
#     offline commands;
#   - service/tests/* but replicas.rs (agent, chat, cloud_run, fuzz_corpus, llm_openai,
#     startup, store, ws, and any new file): the real service binary on loopback with
#     SQLite and the local OpenAI stand-in.
# Left out, and run by `make test`:
#   - service/tests/replicas.rs and the `postgres::` tests of service/tests/store.rs:
#     they start a real PostgreSQL server (chatgate_tests::Postgres, `make postgres`);
#   - tests/tests/*: most run a real kube-apiserver (`make k8s-bins`); monitoring needs
#     `make prom-tools`, status_readers `make status-check`, image the image tools;
#     smoke needs no control plane but first builds every test binary of the
#     workspace (`cargo test --workspace --no-run`), the ones just left out included.
SERVICE_POSTGRES_TESTS := replicas
SERVICE_LOOPBACK_TESTS := $(filter-out $(SERVICE_POSTGRES_TESTS),$(basename $(notdir $(wildcard service/tests/*.rs))))
unit-test: ## every test that needs neither a control plane nor PostgreSQL
	$(CARGO) test --workspace --lib --bins
	$(CARGO) test --workspace --doc
	$(CARGO) test -p chatgate-operator --test '*'
	$(CARGO) test -p chatgate-service $(addprefix --test ,$(SERVICE_LOOPBACK_TESTS)) -- --skip postgres::

e2e: k8s-bins postgres ## the rollout proof: a client fleet through good, broken, slow and drifting rollouts, one table each
	CHATGATE_TEST_IMAGES=release $(CARGO) test --workspace --test rollout -- --nocapture

FUZZ_SECONDS ?= 60
fuzz: ## every fuzz target for FUZZ_SECONDS each (nightly; installs cargo-fuzz if absent)
	hack/fuzz.sh $(FUZZ_SECONDS)

lint: ## formatting, clippy, rustdoc and the supply-chain check; warnings are errors
	$(CARGO) fmt --all -- --check
	$(CARGO) clippy --workspace --all-targets -- -D warnings
	RUSTDOCFLAGS="-D warnings" $(CARGO) doc --workspace --no-deps
	hack/cargo-deny.sh check

deny: ## the supply-chain check alone (deny.toml; advisories only with CHATGATE_ADVISORY_DB, see hack/cargo-deny.sh)
	hack/cargo-deny.sh check

fmt: ## format the code
	$(CARGO) fmt --all

crds: ## regenerate crds/ (and the chart's copy) from the Rust types
	hack/gen-crds.sh

crds-check: ## fail when crds/ is stale (make test checks it too, as a unit test)
	hack/gen-crds.sh --check

bench: k8s-bins postgres ## service vs FastAPI peer side by side, two pods on PostgreSQL, the operator at 500 ChatServices
	hack/bench.sh
	hack/bench.sh --replicas
	$(MAKE) bench-operator

bench-operator: k8s-bins ## the operator at 500 ChatServices on the local control plane
	$(CARGO) build --release -p chatgate-operator
	$(CARGO) test --release -p chatgate-tests --test operator_bench -- --ignored --nocapture

image: ## OCI images of both binaries in target/images (no container daemon needed)
	hack/image.sh

image-push: ## push the images: make image-push REGISTRY=host[:port]/path
	REGISTRY="$(REGISTRY)" hack/image-push.sh

clean:
	$(CARGO) clean
