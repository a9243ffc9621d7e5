VENV := .venv
PY := $(VENV)/bin/python
STAMP := $(VENV)/.installed

.PHONY: test demo lint bench fuzz clean

$(STAMP): setup.py pyproject.toml
	test -x $(PY) || python3 -m venv $(VENV)
	$(PY) -m pip install -q --upgrade pip setuptools wheel
	$(PY) -m pip install -q -e '.[test]' --config-settings editable_mode=compat
	$(PY) -c "from twisted.plugin import IPlugin, getPlugins; list(getPlugins(IPlugin))"
	touch $(STAMP)

test: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) tests/run.py

demo: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) contrib/demo.py

lint: $(STAMP)
	$(VENV)/bin/ruff check malai tests bench twisted contrib
	$(VENV)/bin/mypy

# The fuzz tests of tests/test_fuzz.py with FUZZ_EXAMPLES inputs per format (see docs/security.md).
FUZZ_EXAMPLES ?= 100000
fuzz: $(STAMP)
	MALAI_FUZZ=$(FUZZ_EXAMPLES) PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) tests/run.py tests.test_fuzz

bench: $(STAMP)
	PATH=$(CURDIR)/$(VENV)/bin:$$PATH $(PY) bench/run.py

clean:
	rm -rf $(VENV) build *.egg-info _trial_temp
