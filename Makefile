# fission: every set-up step lives here, so a fresh machine needs only `make demo` or `make test`.
# Targets are idempotent: a second run does only what is missing.

PYTHON ?= python3
VENV := .venv
BIN := $(VENV)/bin
STAMPS := .stamps
APT_PACKAGES := qemu-system-x86 qemu-utils mmdebstrap e2fsprogs cpio busybox-static bubblewrap ca-certificates git python3-venv hyperfine chromium umoci skopeo
SUDO := $(shell [ "$$(id -u)" = 0 ] || echo sudo)
PYTEST_ARGS ?=

.PHONY: setup deps venv protos images demo test unit integration lint clean

setup: deps venv images

deps:
	@missing=""; for p in $(APT_PACKAGES); do \
	  dpkg-query -W -f='$${Status}' $$p 2>/dev/null | grep -q 'install ok installed' || missing="$$missing $$p"; \
	done; \
	if [ -n "$$missing" ]; then \
	  echo "installing Debian packages:$$missing"; \
	  $(SUDO) apt-get update -qq && \
	  DEBIAN_FRONTEND=noninteractive $(SUDO) apt-get install -y -qq --no-install-recommends $$missing; \
	else echo "Debian packages: all present"; fi
	@# the kernel package lookup needs apt's lists even when nothing was installed
	@[ -n "$$(ls /var/lib/apt/lists/ 2>/dev/null | grep -v -e lock -e partial)" ] || $(SUDO) apt-get update -qq

# Editable in setuptools' "compat" mode: a plain path in a .pth file. The default mode installs an
# import hook that every start of the venv's python loads (~9 ms of its ~17 ms; docs/cli.md).
$(STAMPS)/venv: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install -q --upgrade pip
	$(BIN)/pip install -q -e '.[dev]' --config-settings editable_mode=compat
	@mkdir -p $(STAMPS) && touch $@

venv: $(STAMPS)/venv

# gRPC stubs: generated from the .proto and committed (the package ships with them), never edited.
# Only `make protos` makes them again, with the grpcio-tools pinned in pyproject.toml, so a
# regeneration of an unchanged .proto gives the same bytes; test_packaging fails when the
# committed stubs are not what the .proto gives. `-I .` makes protoc name the file
# fission/api/fission.proto, so the generated code imports `from fission.api import fission_pb2`.
PROTO := fission/api/fission.proto

protos: $(STAMPS)/venv
	$(BIN)/python -m grpc_tools.protoc -I . --python_out=. --pyi_out=. --grpc_python_out=. $(PROTO)

images: deps venv
	$(BIN)/fission images build all

demo: setup
	$(BIN)/fission run --lang python "print('Hello from isolation!')"
	$(BIN)/fission run --lang python --file examples/data_analysis.py

lint: venv
	$(BIN)/ruff check fission tests $(wildcard bench)
	$(BIN)/ruff format --check fission
	$(BIN)/mypy

unit: venv
	$(BIN)/pytest tests/unit -q $(PYTEST_ARGS)

integration: setup
	$(BIN)/pytest tests/integration -q $(PYTEST_ARGS)

test: setup lint
	$(BIN)/pytest tests -q -rs $(PYTEST_ARGS)

clean:
	rm -rf $(VENV) $(STAMPS) *.egg-info
