# sglang-ft: the README's commands. `make demo` and `make test` set everything up themselves.
PY := .venv/bin/python

.PHONY: install demo test test-fast bench bench-full docker-check clean

install:
	@bash scripts/install.sh

demo: install
	$(PY) -m sglang_ft.demo

test: install
	$(PY) -m pytest -q -ra --durations=15

test-fast: install
	$(PY) -m pytest -q -ra tests/unit

bench: install
	$(PY) benchmark/bench_all.py

bench-full: install
	$(PY) benchmark/bench_all.py --full

# Build docker/Dockerfile.cpu, serve it, kill a TP worker inside the container, check the recovery (needs root or a
# Docker engine; not part of `make test`).
docker-check:
	bash scripts/docker_check.sh

clean:
	rm -rf .venv build *.egg-info .pytest_cache
