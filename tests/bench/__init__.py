"""smtproxy's benchmark suite (issue 8): ``python -m tests.bench SCENARIO [options]``.

Not a test package: nothing here is collected by pytest (see ``conftest.py``). See
BENCHMARKS.md at the top of the repository for the scenarios, the commands and the figures.
"""
