# Two commands do all set-up on a fresh machine (offline apart from the package registry):
#   make demo   builds .venv, installs the project, runs the end-to-end example on examples/
#   make test   builds .venv, installs the project with test extras, runs the linter and the test suite
PYTHON ?= python3
VENV   ?= .venv
BIN    := $(VENV)/bin
DEMO_OUT ?= demo-out

.PHONY: demo test venv bench clean

# torch 2.14.1 + torchvision 0.29.1: a pair that imports together (a torchvision built for
# another torch fails with "operator torchvision::nms does not exist").
TORCH ?= torch==2.14.1 torchvision==0.29.1

$(BIN)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/pip install --quiet --upgrade pip
	$(BIN)/pip install --quiet $(TORCH)
	$(BIN)/pip install --quiet -e '.[train,test]'
	touch $@

venv: $(BIN)/.installed

demo: venv
	OWNER_AGENT_HOME=$(abspath $(DEMO_OUT))/owner-home $(BIN)/python scripts/demo.py --out $(DEMO_OUT)

test: venv
	$(BIN)/ruff check .
	$(BIN)/python -m pytest -q

clean:
	rm -rf $(VENV) $(DEMO_OUT)
