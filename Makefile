# The two commands of README.md. Each is self-contained: it makes .venv, installs, runs.
#   make demo   set up, then run the main job
#   make test   set up, then run every test (pytest over tests/ and nbval over notebooks/)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# torch first, pinned: a bare `torch` would pull the newest CUDA build; these two import together
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1

.PHONY: demo test setup clean

setup: $(VENV)/.installed

$(VENV)/.installed: pyproject.toml
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	$(BIN)/python -m pip install $(TORCH_SPEC)
	$(BIN)/python -m pip install -e ".[test,notebooks]"
	touch $@

demo: setup
	MPLBACKEND=Agg $(BIN)/python -m mrcnn_edu demo

# Two pytest workers (-n 2), one file each at a time (notebooks keep their cells together),
# one thread each: on a 2-core machine, more threads than cores thrash.
# pytest exits 5 when it collects nothing: that alone is not a failure, anything else is.
test: setup
	OMP_NUM_THREADS=1 MPLBACKEND=Agg $(BIN)/python -m pytest tests notebooks --nbval-lax --nbval-current-env \
		-n 2 --dist loadfile -p no:cacheprovider --durations 15; \
	rc=$$?; if [ $$rc -eq 5 ]; then echo "pytest collected no tests"; rc=0; fi; exit $$rc

clean:
	rm -rf $(VENV) runs data/generated
