# Two commands do everything on a fresh clone:
#   make reproduce   set up .venv, run every notebook in order (PROFILE=cpu by default) and the paper-length
#                    experiment into $(REPRODUCE), then print its numbers beside the committed ones
#   make test        set up .venv, lint, and run the test suite, notebooks included (what CI runs)
# and two prepare a workshop and open the notebooks to step through them:
#   make warm        offline, before a session: convert the backbone, fill the caches, train the smoke runs
#   make lab         set up .venv, register its Jupyter kernel, start JupyterLab on notebooks/ (docs/workshop.md)
PROFILE ?= cpu
REPRODUCE ?= runs/reproduce
PY := .venv/bin/python
export PYTHONHASHSEED := 0

.PHONY: reproduce test lab warm notebooks-smoke compare bench doctor

.venv/.installed: requirements.txt requirements-assets.txt pyproject.toml
	test -x $(PY) || python3 -m venv .venv
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q --no-compile torch==2.13.0  # first: otherwise pip may pull a multi-GB CUDA build
	$(PY) -m pip install -q --no-compile -r requirements.txt
	# byte-compiled here, on every core, not by pip one file at a time (torch: 12 s in pip, 4 s here); not left to imports
	# either: where PYTHONDONTWRITEBYTECODE is set (as on the machines this kit is tested on) they never write a .pyc, and
	# every process (each notebook's kernel, each worker) would compile torch, transformers, umap, ... again: 2-3 s apiece.
	# torch's test helpers are skipped: they hold Python 3.12 syntax
	$(PY) -m compileall -q -j 0 -x '/torch/testing/_internal/' $$($(PY) -c 'import sysconfig; print(sysconfig.get_paths()["purelib"])') > /dev/null
	$(PY) -m pip install -q --no-deps -r requirements-assets.txt
	$(PY) -m pip install -q --no-deps -e .
	touch $@

# One pytest run: the unit tests, then every notebook executed once on the smoke profile. nbval runs
# in lax mode: every cell must run, and the cells tagged nbval-check-output (data, shapes, counts)
# must print what is committed; numbers a model computes are checked by assertion cells instead,
# since another CPU changes their last digits. The results and figures the notebooks write go to a
# temporary folder (CHAMELEON_OUTPUTS), so that `make test` changes no tracked file, and tqdm is
# silenced (TQDM_DISABLE) as in the committed outputs. The linter runs first (ruff.toml), in seconds.
test: .venv/.installed
	$(PY) -m ruff check .
	out=$$(mktemp -d) && CHAMELEON_OUTPUTS=$$out TQDM_DISABLE=1 CHAMELEON_PROFILE=smoke \
		$(PY) -m pytest -q --durations=25 tests notebooks \
		--nbval-lax --nbval-sanitize-with tests/nbval_sanitize.cfg; rc=$$?; rm -rf $$out; exit $$rc

# Step through the notebooks: the kit's kernel ("ChamaleonLLM kit") runs .venv's Python; opened this
# way a notebook uses the cpu profile and shows progress bars on its long cells.
# Where JupyterLab listens: LAB_IP=0.0.0.0 to reach it from outside a container (e.g. `docker run -p 8888:8888`).
# As root (a container), jupyter refuses to start without --allow-root: it is added then only. Without a display
# (no $$DISPLAY, not macOS) no browser is opened: open the http://...?token=... URL that jupyter prints.
LAB_IP ?= 127.0.0.1
LAB_PORT ?= 8888
lab: .venv/.installed
	$(PY) -m ipykernel install --user --name chameleon-kit --display-name "ChamaleonLLM kit"
	.venv/bin/jupyter lab notebooks/ --ip=$(LAB_IP) --port=$(LAB_PORT) \
		$$([ "$$(id -u)" = 0 ] && echo --allow-root) \
		$$([ -z "$$DISPLAY" ] && [ "$$(uname)" != Darwin ] && echo --no-browser)

# Before a workshop, offline: execute every notebook once on the smoke profile (copies in runs/smoke/, the
# committed notebooks untouched). That converts the embedded backbone (data/cache/models), fills the embedding,
# hidden-state and SVD caches, and trains the smoke runs the notebooks read back (results/smoke/), so that in
# the session each notebook runs in seconds to a minute. It prints each notebook's time (docs/workshop.md).
# The notebooks that draw the committed cpu / study tables (06, 08, 10) redraw those figures in figures/.
warm: .venv/.installed
	$(PY) -m chameleon notebooks --profile smoke

# Refresh the committed notebook outputs and figures/smoke (run after changing a notebook or a figure).
notebooks-smoke: .venv/.installed
	$(PY) -m chameleon notebooks --profile smoke --in-place

# A user's run writes its results and figures to $(REPRODUCE) (CHAMELEON_OUTPUTS), never over the committed ones,
# which change only through an explicit command (compare, report, notebooks-smoke).
reproduce: export CHAMELEON_OUTPUTS = $(abspath $(REPRODUCE))
reproduce: .venv/.installed
	$(PY) -m chameleon notebooks --profile $(PROFILE)
	$(PY) -m chameleon compare --profile $(PROFILE) --experiment paper-length --seeds 3
	$(PY) -m chameleon report --check $(REPRODUCE)

compare: .venv/.installed
	$(PY) -m chameleon compare --profile $(PROFILE) --seeds 3

bench: .venv/.installed
	$(PY) -m benchmarks.bench_embeddings
	$(PY) -m benchmarks.bench_training
	$(PY) -m benchmarks.bench_head
	$(PY) -m benchmarks.bench_serving
	$(PY) -m benchmarks.bench_serve_http
	$(PY) -m benchmarks.bench_svf
	$(PY) -m benchmarks.bench_memory --profile cpu
	$(PY) -m benchmarks.bench_memory --profile study

doctor: .venv/.installed
	$(PY) -m chameleon doctor
