# make demo  -> fine-tune the tiny preset on the bundled data with L2T, print before/after answers
# make test  -> the test suite, in a random order (the seed is printed at the top)
VENV ?= .venv
PY := $(VENV)/bin/python

.PHONY: demo test ui lint

$(VENV)/.installed: requirements.txt requirements-test.txt
	python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip
	$(PY) -m pip install -q -r requirements.txt -r requirements-test.txt
	touch $@

demo: $(VENV)/.installed
	$(PY) -m l2t.train --preset tiny --output runs/demo --overwrite

test: $(VENV)/.installed
	$(PY) -m pytest --random-order

ui: $(VENV)/.installed
	$(PY) -m app

lint: $(VENV)/.installed
	$(PY) -m ruff check l2t app tests bench tools
