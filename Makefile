# The two commands a newcomer needs:
#   make demo   train kk-tiny through stage 3 on CPU, evaluate, and write the reports
#   make test   run the test suite
# Both create .venv and install what they need first.

PY := .venv/bin/python
SCHEDULE ?= kk-tiny
RUN ?= kk-tiny
SEEDS ?= 0,1,2

.PHONY: setup demo test seeds bench clean-runs

setup:
	@bash scripts/setup.sh

demo: setup
	$(PY) -m train.run stage3 --schedule $(SCHEDULE)
	$(PY) -m analysis eval --run $(RUN) --every 2 --people 3,5 --n-per-size 25 --max-new-tokens 640
	$(PY) -m analysis report --run $(RUN) --every 4 --puzzle-sizes 3,5 --puzzles-per-size 8 --max-new-tokens 640 \
		--set probes.n_permutations=20 --set probes.control_draws=2

test: setup
	$(PY) -m pytest -q -p no:cacheprovider tests

# The demo's dynamics over GRPO seeds (mean and 95% interval): about 7.5 minutes of training per
# seed on 2 cores, then about 12 minutes of evaluation of every stage end (docs/results.md).
seeds: setup
	$(PY) -m train.run stage3 --schedule $(SCHEDULE) --seeds $(SEEDS)
	$(PY) -m analysis seeds --run $(RUN) --seeds $(SEEDS)

bench: setup
	$(PY) bench/bench_generator.py
	$(PY) bench/bench_reward.py

clean-runs:
	rm -rf runs reports
