"""The benchmark suite is run by hand (``python -m tests.bench``), never by pytest: its
numbers are not timed tests (issue 8). Nothing in this directory is collected."""

collect_ignore_glob = ["*.py"]
