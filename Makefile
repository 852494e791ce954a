# `make demo` and `make test` set everything up themselves on a fresh machine (Python 3.11 + pip).
VENV ?= .venv
PY := $(VENV)/bin/python
FIXTURE := tests/fixtures/official-tiny
export TOKENIZERS_PARALLELISM := false
export HF_HUB_OFFLINE := 1

.PHONY: setup demo convert-demo test bench-speed clean

$(VENV)/.installed: pyproject.toml requirements-ci.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install --quiet --upgrade pip
	$(PY) -m pip install --quiet -r requirements-ci.txt
	$(PY) -m pip install --quiet --no-deps -e .
	$(PY) tests/transformers_sdist.py  # transformers' generic tests (sdists of 5.23 and 5.24, cached once)
	touch $@

setup: $(VENV)/.installed

# The main job: train tiny-en on the bundled corpus, reload it as remote code, report held-out bits/char and
# print a generated continuation (`Generated: ...`).
demo: setup
	THP_MEM_ALLOC_ENABLE=1 $(VENV)/bin/brillm train --config configuration/train/tiny-en.yaml --output-dir outputs/tiny-en

# Convert the bundled reference-format checkpoint (tests/fixtures/official-tiny) and generate from it.
convert-demo: setup
	$(PY) conversion/convert_official_checkpoint.py --checkpoint $(FIXTURE)/model.bin --vocab $(FIXTURE)/vocab.json \
		--frequencies $(FIXTURE)/word_frequency.json --output outputs/official-tiny
	$(VENV)/bin/brillm generate outputs/official-tiny --prompt-ids 17,61,61 --max-new-tokens 16 --vocab $(FIXTURE)/vocab.json

# Our scoring, training and generation against the in-repo reference path: a table, and outputs/speed.json.
bench-speed: setup
	mkdir -p outputs
	$(PY) benchmarks/bench_speed.py --json outputs/speed.json --compile

test: setup
	$(PY) -m pytest -q

clean:
	rm -rf $(VENV) outputs
