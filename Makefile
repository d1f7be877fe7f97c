# The two commands a newcomer needs:
#   make demo   train kk-tiny through stage 3 on CPU, evaluate, and write the reports
#   make test   run the test suite
# Both create .venv and install what they need first.

PY := .venv/bin/python
SCHEDULE ?= kk-tiny
RUN ?= kk-tiny

.PHONY: setup demo test bench clean-runs

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m train.run stage3 --schedule $(SCHEDULE)
	$(PY) -m analysis eval --run $(RUN) --stage base,stage3 --people 3,5 --n-per-size 25 --max-new-tokens 768
	$(PY) -m analysis report --run $(RUN) --every 2 --probe-per-size 4 --max-new-tokens 384

test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests

bench: setup
	$(PY) bench/bench_generator.py
	$(PY) bench/bench_reward.py

clean-runs:
	rm -rf runs reports
