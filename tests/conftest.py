"""Suite-wide pytest setup.

- The repository root is put on ``sys.path`` so ``from tests.integration.peers import ...``
  works however pytest is started (``pytest`` or ``python -m pytest``, any import mode).
  That is the one way to import the harness: the module is also registered as ``peers``
  so that a bare ``import peers`` gets the same module object (two copies would have two
  ``SmtproxyExited`` classes, and ``pytest.raises`` would miss one of them).
- The end of the run names the versions of the real peers the integration tests drive
  (also under ``-q``), so a CI log says which Postfix/OpenSSL/swaks a result came from.
"""

from __future__ import annotations

import shutil
import ssl
import subprocess
import sys
from pathlib import Path
from typing import Any

REPO_ROOT = Path(__file__).resolve().parent.parent
if str(REPO_ROOT) not in sys.path:
    sys.path.insert(0, str(REPO_ROOT))

import tests.integration.peers as _peers  # noqa: E402  (needs the path above)

sys.modules.setdefault("peers", _peers)


def _first_line(*command: str) -> str:
    if shutil.which(command[0]) is None:
        return "not installed"
    try:
        result = subprocess.run(
            command, capture_output=True, text=True, timeout=10, stdin=subprocess.DEVNULL
        )
    except (OSError, subprocess.TimeoutExpired) as exc:
        return f"error: {exc}"
    lines = (result.stdout or result.stderr).strip().splitlines()
    return lines[0] if lines else "unknown"


def pytest_terminal_summary(terminalreporter: Any) -> None:
    terminalreporter.write_line(
        "peers: postfix {} | {} | swaks {} | python ssl: {}".format(
            _first_line("postconf", "-d", "-h", "mail_version"),
            _first_line("openssl", "version"),
            _first_line("swaks", "--version").removeprefix("swaks version "),
            ssl.OPENSSL_VERSION,
        )
    )
