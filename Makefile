# Shortcuts for the README's two commands (and a lint that needs nothing extra installed).
.PHONY: test run lint

test:
	scripts/test

run:
	scripts/run-example

lint:
	bash -n scripts/install-test-deps scripts/test scripts/run-example .ci/run
	.venv/bin/python -m compileall -q smtproxy tests
