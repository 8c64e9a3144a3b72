# One command for each job. Each installs what is missing first (scripts/bootstrap.sh: Debian packages,
# .venv, libvirtd), so a fresh Debian machine needs nothing else.
VENV      := .venv
BIN       := $(VENV)/bin
ARGS      ?=
PYTEST    ?= $(BIN)/python -m pytest

.PHONY: setup run test test-fast test-kvm lint bench reliability clean

setup:
	@bash scripts/bootstrap.sh

## make run: the server with its defaults (qemu:///system, 127.0.0.1:8686); ARGS="--hypervisor test:///default"
run: setup
	$(BIN)/vmquota serve $(ARGS)

## make test: every test: unit and API tests on test:///default, end-to-end tests on real KVM
test: setup
	$(PYTEST) -q $(ARGS)

## make test-fast: everything but the real-KVM end-to-end tests
test-fast: setup
	$(PYTEST) -q -m "not kvm" $(ARGS)

test-kvm: setup
	$(PYTEST) -q -m kvm $(ARGS)

lint: setup
	$(BIN)/ruff check vmquota tests
	$(BIN)/mypy
	$(BIN)/lint-imports

bench: setup
	$(BIN)/python -m benchmarks $(ARGS)

## make reliability: the reliability suite's long run (tests/reliability, VMQUOTA_RELIABILITY=long): model-based
## sequences, a concurrency storm, SIGKILL rounds and hypervisor faults on real KVM (libvirtd is killed and
## restarted), fuzzing; what it did goes to reliability-results/figures.jsonl, summed up at the end.
## `make test` runs the same tests with a fast sample.
reliability: setup
	@mkdir -p reliability-results && rm -f reliability-results/figures.jsonl
	VMQUOTA_RELIABILITY=long VMQUOTA_RELIABILITY_FIGURES=reliability-results/figures.jsonl \
		$(PYTEST) -q tests/reliability $(ARGS)
	@$(BIN)/python tests/reliability/summary.py reliability-results/figures.jsonl

clean:
	rm -rf $(VENV) *.egg-info .pytest_cache .mypy_cache .ruff_cache .hypothesis bench-results reliability-results
