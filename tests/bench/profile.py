"""Profile smtproxy under load with py-spy (``pip install py-spy``; not a dependency of the
project): ``py-spy record --native --format raw`` attached to the running smtproxy for one
extra, unmeasured run, then the collapsed stacks summarised as the functions with the most
self time and the most inclusive time (idle samples excluded)."""

from __future__ import annotations

import collections
import os
import re
import shutil
import subprocess
import sys
import threading
from pathlib import Path
from typing import Any

from tests.bench import loadgen
from tests.bench.systems import System


def py_spy() -> str | None:
    local = Path(sys.executable).parent / "py-spy"
    return str(local) if local.exists() else shutil.which("py-spy")


def _frame_name(frame: str) -> str:
    # "function (path/to/file.py:123)" -> "function (dir/file.py)"; unsymbolised native
    # frames ("0x7f... (libcrypto.so.3)") -> "[libcrypto.so.3]"
    match = re.match(r"(.*?) \((.*?)(?::\d+)?\)$", frame)
    if not match:
        return frame
    function, path = match.groups()
    if function.startswith("0x"):
        return f"[{Path(path).name}]"
    return f"{function} ({'/'.join(Path(path).parts[-2:])})"


# Inclusive-time categories: the first matching frame of a stack decides (most specific first).
CATEGORIES = (
    ("TLS handshake (SSLObject.do_handshake, OpenSSL)", ("do_handshake (",)),
    ("TLS records (SSLObject.read/write/unwrap)", ("SSLObject.read (", "SSLObject.write (", "SSLObject.unwrap (")),
    ("handshake facts, Received clause, event bus", ("build_facts", "received_clause", "EventBus.publish",
                                                     "_msg_callback")),
    ("logging (structlog, JSON)", ("structlog/", "json/")),
    ("SMTP parsing and session logic (smtproxy/smtp, inbound/session, outbound/session)",
     ("smtp/", "inbound/session.py", "outbound/session.py")),
    ("socket writes (uvloop write)", ("UVStream_write (",)),
    ("connection set-up (create_connection, accept)", ("create_connection", "uv__server_io", "connection_made")),
)


def _interesting(frame: str) -> bool:
    return any(key in frame for key in ("smtproxy", "inbound/", "outbound/", "tls/", "smtp/", "telemetry/",
                                        "structlog/", "ssl.py", "_ssl.c", "json/", "enum.py", "libssl",
                                        "libcrypto", "events.py", "policy/", "routing/"))


def summarise(raw: Path, top: int = 25) -> dict[str, Any]:
    self_time: collections.Counter[str] = collections.Counter()
    inclusive: collections.Counter[str] = collections.Counter()
    categories: collections.Counter[str] = collections.Counter()
    total = 0
    for line in raw.read_text(errors="replace").splitlines():
        stack, _, count = line.rpartition(" ")
        if not stack or not count.isdigit():
            continue
        n = int(count)
        frames = [_frame_name(f) for f in stack.split(";")]
        frames = [f for f in frames if not f.startswith("process ") and not f.startswith("thread ")]
        if not frames:
            continue
        # the event loop waiting in epoll is idle time, not cost
        if any(f.startswith(("epoll_wait", "epoll_pwait")) or "select (selectors" in f for f in frames[-2:]):
            continue
        total += n
        self_time[frames[-1]] += n
        for frame in set(frames):
            if _interesting(frame):
                inclusive[frame] += n
        for title, keys in CATEGORIES:
            if any(key in frame for frame in frames for key in keys):
                categories[title] += n
                break
        else:
            categories["other (event loop, Python runtime, ...)"] += n
    pct = lambda n: round(100 * n / total, 1) if total else 0.0  # noqa: E731
    return {
        "busy_samples": total,
        "categories": [(name, pct(n)) for name, n in categories.most_common()],
        "self": [(name, pct(n)) for name, n in self_time.most_common(top)],
        "inclusive": [(name, pct(n)) for name, n in inclusive.most_common(top * 2)],
    }


def profile_run(system: System, spec: loadgen.LoadSpec, output: Path, seconds: float,
                cpus: set[int] | None) -> dict[str, Any]:
    tool = py_spy()
    if tool is None:
        return {"error": "py-spy is not installed (.venv/bin/pip install py-spy)"}
    output.parent.mkdir(parents=True, exist_ok=True)
    raw = output.with_suffix(".raw")
    command = [tool, "record", "--native", "-r", "200", "-f", "raw", "-o", str(raw),
               "-d", str(int(seconds) + 1), "-p", str(system.root_pid())]
    spy = subprocess.Popen(command, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE,
                           preexec_fn=(lambda: os.sched_setaffinity(0, cpus)) if cpus else None)
    errors: list[bytes] = []
    reader = threading.Thread(target=lambda: errors.append(spy.stderr.read()), daemon=True)
    reader.start()
    import uvloop

    result = uvloop.run(loadgen.run_load(spec))
    try:
        spy.wait(timeout=seconds + 30)
    except subprocess.TimeoutExpired:
        spy.kill()
        spy.wait()
    reader.join(5)
    if not raw.exists():
        return {"error": f"py-spy wrote no profile: {b''.join(errors).decode(errors='replace')[-500:]}"}
    summary = summarise(raw)
    summary["load"] = result.summary()
    lines = [f"# py-spy --native, {summary['busy_samples']} busy samples; load: {summary['load']}", "",
             "## where the time goes (inclusive, each sample counted once, first matching category)"]
    lines += [f"{p:6.1f}  {name}" for name, p in summary["categories"]]
    lines += ["", "## self time (% of busy samples)"]
    lines += [f"{p:6.1f}  {name}" for name, p in summary["self"]]
    lines += ["", "## inclusive time"]
    lines += [f"{p:6.1f}  {name}" for name, p in summary["inclusive"]]
    output.write_text("\n".join(lines) + "\n")
    summary["file"] = str(output)
    return summary
