# Two commands do all set-up on a fresh machine: `make demo` and `make test`.
PYTHON ?= python3
VENV   ?= .venv
PY     := $(VENV)/bin/python
CLI    := $(VENV)/bin/clipfold
STAMP  := $(VENV)/.clipfold-installed
DEMO   ?= out/demo

.PHONY: install browser demo test test-all test-families test-tokenizer-sweep bench bench-kernels bench-serve bench-ray fewshot train-tiny clean

$(STAMP): pyproject.toml kernels/topk/_topk.c kernels/topk/_topk_avx2.h kernels/topk/_topk_avx512.h kernels/vit/_vit.c kernels/_exp8.h
	test -x $(PY) || $(PYTHON) -m venv $(VENV)
	$(PY) -m pip install -q -e '.[dev]'
	touch $(STAMP)

install: $(STAMP)

# The main job on the embedded default model: compile, inspect, classify.
demo: $(STAMP)
	$(PY) -m clipfold.compile.tiny.samples --out $(DEMO)
	$(CLI) compile --labels $(DEMO)/labels.txt --out $(DEMO)/tiny.bundle --overwrite --text
	$(CLI) inspect $(DEMO)/tiny.bundle
	$(CLI) classify $(DEMO)/tiny.bundle $(DEMO)/images/*.png --top-k 3
	# Few-shot: fit GDA on 12 shots of a task whose names the model rarely saw in training, compare.
	$(CLI) fit gda --support $(DEMO)/fewshot/support --templates $(DEMO)/fewshot/templates.txt --out $(DEMO)/gda.safetensors
	$(CLI) compile --labels $(DEMO)/fewshot/labels.txt --templates $(DEMO)/fewshot/templates.txt --out $(DEMO)/zero-shot.bundle --overwrite
	# The adapted bundle with int8 variants, each gated against fp32 on the labelled test images, and
	# the CPU alternatives to fp32 kept only where this CPU runs them faster than fp32: clipfold's own
	# AVX2 kernel (checked against open_clip eager) and bf16 on AMX / AVX512-BF16 (gated).
	$(CLI) compile --adapter $(DEMO)/gda.safetensors --out $(DEMO)/gda.bundle --overwrite \
		--precision int8-dynamic,int8-static,int4-weight --if-faster fp32-native,bf16 \
		--calib $(DEMO)/fewshot/support --gate-data $(DEMO)/fewshot/test
	$(CLI) evaluate $(DEMO)/zero-shot.bundle $(DEMO)/fewshot/test
	$(CLI) evaluate $(DEMO)/gda.bundle $(DEMO)/fewshot/test
	# Swappable heads: the same adapter as a second head of the first bundle, no image tower re-exported.
	$(CLI) head add $(DEMO)/tiny.bundle --name backgrounds --adapter $(DEMO)/gda.safetensors --overwrite
	$(CLI) evaluate $(DEMO)/tiny.bundle $(DEMO)/fewshot/test --head backgrounds
	# Latency vs accuracy of every variant and of open_clip eager on this machine, with the Pareto plot.
	$(CLI) profile $(DEMO)/gda.bundle --data $(DEMO)/fewshot/test --batch 1,8 --rounds 10 --out $(DEMO)/profile
	# The profile is recorded in the bundle for this CPU: --variant auto takes the fastest variant from it.
	$(CLI) classify $(DEMO)/gda.bundle $(DEMO)/images/*.png --top-k 1 --variant auto
	# Retrieval: index the generated photos with the tiny bundle, then find them by text (no torch at search time).
	rm -rf $(DEMO)/photos.index
	$(CLI) index $(DEMO)/tiny.bundle $(DEMO)/photos --out $(DEMO)/photos.index
	$(CLI) search $(DEMO)/photos.index --text "a green triangle" --top-k 5
	@echo
	@echo "Serve the demo bundle and its index (HTTP on 8000 with the page, gRPC on 8001), then open http://127.0.0.1:8000/ui :"
	@echo "  $(CLI) serve $(DEMO)/tiny.bundle --index $(DEMO)/photos.index"

# The page's browser test (tests/test_ui.py) drives Debian's headless chromium through chromedriver:
# installed here when missing and this runs as root with apt-get (CI); otherwise that test skips, saying why.
browser:
	@if command -v chromium >/dev/null 2>&1 && command -v chromedriver >/dev/null 2>&1; then :; \
	elif [ "$$(id -u)" = 0 ] && command -v apt-get >/dev/null 2>&1; then \
		(apt-get update -qq && DEBIAN_FRONTEND=noninteractive apt-get install -y -qq chromium chromium-driver >/dev/null) \
			|| echo "could not install chromium: the browser test will be skipped"; \
	else echo "no chromium + chromedriver (not root with apt-get): the browser test will be skipped"; fi

# The suite runs on TEST_WORKERS pytest-xdist workers (TEST_WORKERS=0: in this one process), each given
# a whole test file at a time so a file's fixtures are built once; a worker's torch uses one thread.
TEST_WORKERS ?= 2
test: $(STAMP) browser
	$(PY) -m pytest -q -n $(TEST_WORKERS) --dist loadfile

# Includes the tests marked slow, in one process: they compile large models whose memory peaks
# were measured one compile at a time on the 24 GiB machine.
test-all: $(STAMP) browser
	$(PY) -m pytest -q -m "slow or not slow"

# One registered model of every open_clip family compiled with --text, random weights (tests/test_families.py):
# each passes parity or is refused in one line. Long: a few minutes per model on 2 cores, under 6 GB.
# Then ViT-L-14 with int8 variants and --text under 8 GiB peak (tests/test_large_models.py, ~20 min).
test-families: $(STAMP)
	$(PY) -m pytest -q -m slow tests/test_families.py tests/test_large_models.py

# The bundled CLIP tokenizer against open_clip.tokenize on all 1,112,064 code points (about 10 minutes).
test-tokenizer-sweep: $(STAMP)
	$(PY) -m pytest -q -m slow tests/test_tokenizer_parity.py

bench: $(STAMP)
	$(PY) -m pytest benchmarks/test_bench_image_topk.py -q --benchmark-only --benchmark-columns=median,iqr,min,rounds \
		--benchmark-json=benchmarks/results/latest.json
	$(PY) -m pytest benchmarks/test_bench_head_build.py -q --benchmark-only --benchmark-columns=median,rounds \
		--benchmark-json=benchmarks/results/latest-head-build.json

# Similarity + top-k over 1M x 512 against numpy, torch, faiss and a read floor, CPU named (about 5 minutes
# quiet, 6 GB of memory; CLIPFOLD_BENCH_TOPK_ROWS=500000 halves both), then the per-core cross-check.
bench-kernels: $(STAMP)
	$(PY) -m pytest benchmarks/test_bench_topk.py -q --benchmark-only --benchmark-columns=median,iqr,min,rounds \
		--benchmark-json=benchmarks/results/latest-kernels.json
	$(PY) -m pytest benchmarks/test_bench_kernel_head.py -q --benchmark-only --benchmark-columns=median,iqr,rounds \
		--benchmark-json=benchmarks/results/latest-kernel-head.json
	$(PY) -m benchmarks.topk_per_core

# The few-shot table: every fitting method at 1/2/4/8/16 shots vs zero-shot, through real bundles.
fewshot: $(STAMP)
	$(PY) -m benchmarks.fewshot

# clipfold serve under load (loopback): dynamic batching vs batch-1 at concurrency 1-64, about 2 minutes.
bench-serve: $(STAMP)
	$(PY) -m benchmarks.bench_serve

# Ray Data embedding on a local 2-CPU Ray instance against the single-process runtime.
bench-ray: $(STAMP)
	$(PY) -m benchmarks.bench_ray

# Re-train the embedded tiny model (deterministic, one thread; about 40 minutes on 2 cores).
train-tiny: $(STAMP)
	$(PY) -m clipfold.compile.tiny.train --out compile/tiny/clipfold-tiny.safetensors --steps 6000 --threads 1

clean:
	rm -rf $(VENV) out .pytest_cache .benchmarks
