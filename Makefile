# The two commands of README.md. Each is self-contained: it makes .venv, installs, runs.
#   make demo   set up, then run the main job
#   make test   set up, then run every test (pytest over tests/ and nbval over notebooks/)
PYTHON ?= $(shell command -v python3.11 || command -v python3)
VENV := .venv
BIN := $(VENV)/bin
# torch first, pinned: a bare `torch` would pull the newest CUDA build; these two import together
TORCH_SPEC ?= torch==2.14.1 torchvision==0.29.1
# That pair is a CUDA build, ~5.6 GB in the venv. Where the disk has less than MIN_FREE_MB free, or
# installing it fails, the setup says so and takes torch 2.13.0 without torchvision instead. That is
# a CPU wheel (~1 GB) only where pip finds 2.13.0+cpu first (this project's machines: pip's
# find-links, /opt/wheels); from PyPI, torch==2.13.0 on Linux is a CUDA build with its nvidia-*
# wheels. Every test still runs but those against torchvision, which skip and are counted in
# pytest's summary. A TORCH_SPEC given to make is installed as given, or fails.
MIN_FREE_MB ?= 8000
SMALL_TORCH_SPEC := torch==2.13.0

.PHONY: demo test setup clean

setup: $(VENV)/.installed

# The TORCH_SPEC the venv was last set up for: another one (`make test TORCH_SPEC=...` on an
# existing .venv) makes the setup run again; the same one leaves the file, and the venv, alone.
SPEC_FILE := $(VENV)/.torch_spec
$(shell mkdir -p $(VENV) && { [ "$$(cat $(SPEC_FILE) 2>/dev/null)" = '$(TORCH_SPEC)' ] || echo '$(TORCH_SPEC)' > $(SPEC_FILE); })

$(VENV)/.installed: pyproject.toml $(SPEC_FILE)
	$(PYTHON) -m venv $(VENV)
	$(BIN)/python -m pip install --upgrade pip
	@spec="$(TORCH_SPEC)"; free=$$(df -Pm . | awk 'NR == 2 {print $$4}'); \
	if [ "$(origin TORCH_SPEC)" = file ] && [ "$$free" -lt $(MIN_FREE_MB) ]; then \
		echo "WARNING: $$free MB free here, under the $(MIN_FREE_MB) MB that $$spec needs:" \
			"installing $(SMALL_TORCH_SPEC) without torchvision; the oracle tests will skip"; \
		spec="$(SMALL_TORCH_SPEC)"; \
	fi; \
	echo "pip install $$spec"; \
	if $(BIN)/python -m pip install --no-cache-dir $$spec; then exit 0; fi; \
	if [ "$(origin TORCH_SPEC)" != file ] || [ "$$spec" = "$(SMALL_TORCH_SPEC)" ]; then exit 1; fi; \
	echo "WARNING: installing $$spec failed (above): making .venv again with $(SMALL_TORCH_SPEC)" \
		"without torchvision; the oracle tests will skip"; \
	rm -rf $(VENV) && $(PYTHON) -m venv $(VENV) && $(BIN)/python -m pip install --upgrade pip && \
		$(BIN)/python -m pip install --no-cache-dir $(SMALL_TORCH_SPEC)
	$(BIN)/python -m pip install -e ".[test,notebooks]"
	echo '$(TORCH_SPEC)' > $(SPEC_FILE)  # again: the fallback above made .venv anew
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
