# Two commands: `make run` (the main job) and `make test`. Both install into .venv from scratch.
# torch is installed first and pinned, so pip never pulls CUDA wheels on a CPU machine;
# on a GPU machine use e.g. `make run TORCH_SPEC=torch`.
PYTHON ?= python3
VENV ?= .venv
TORCH_SPEC ?= torch==2.13.0
BIN := $(VENV)/bin
PIP := $(BIN)/python -m pip -q --disable-pip-version-check
CONFIG ?= examples/digits.yaml

.PHONY: install run test lint bench clean proto

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(PIP) install "$(TORCH_SPEC)"
	$(PIP) install -e ".[dev]"
	$(BIN)/python -c "import distml, torch; print('distml', distml.__version__, 'torch', torch.__version__)"
	touch $@

install: $(BIN)/.installed

run: install
	$(BIN)/distml run $(CONFIG)

lint: install
	$(BIN)/ruff check .

# Three workers on two cores: most tests wait on processes they start (ranks, servers,
# clusters, paced jobs), so with two at a time the cores sat idle a third of the time;
# tests that share a machine-wide resource are grouped onto one worker (tests/conftest.py).
TEST_WORKERS ?= 3
test: lint
	$(BIN)/pytest -q -n $(TEST_WORKERS) --dist loadgroup

bench: install
	$(BIN)/python -m bench

# The gRPC protocol's Python code, shipped in the package: regenerate after editing the .proto.
# grpcio-tools 1.75 emits code for protobuf >= 6.31, which protobuf 7 runs as well. The
# messages go into a descriptor pool of their own (not the default one), so that they live
# beside another copy of the protocol in one process (tritonclient's, KServe's).
PROTO := src/distml/serving/proto/open_inference_grpc
proto:
	$(PYTHON) -m venv .venv-proto
	.venv-proto/bin/python -m pip -q install grpcio-tools==1.75.1
	.venv-proto/bin/python -m grpc_tools.protoc -I src --python_out=src --pyi_out=src $(PROTO).proto
	sed -i 's/_descriptor_pool.Default()/_descriptor_pool.DescriptorPool()/' $(PROTO)_pb2.py

clean:
	rm -rf $(VENV) runs registry .pytest_cache
