"""Shared bits of the benchmark scripts: machine facts, best-of-N timing, markdown and JSON output."""
from __future__ import annotations

import json
import os
import platform
import shlex
import socket
import subprocess
import sys
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parent.parent


def machine_facts() -> dict:
    import numba
    import numpy
    import PIL

    try:
        commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], cwd=ROOT, capture_output=True,
                                text=True, check=True).stdout.strip()
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], cwd=ROOT,
                               capture_output=True, text=True).stdout.strip()
        commit += "+dirty" if dirty else ""
    except (OSError, subprocess.CalledProcessError):
        commit = "unknown"
    return {
        "cpu_count": os.cpu_count(),
        "numba_threads": numba.get_num_threads(),
        "machine": platform.machine(),
        "python": platform.python_version(),
        "numpy": numpy.__version__,
        "Pillow": PIL.__version__,
        "numba": numba.__version__,
        "git_commit": commit,
    }


def best_of(fn, repeat: int, number: int = 1) -> float:
    """Best (smallest) wall time in seconds of ``number`` calls of ``fn``, over ``repeat`` tries."""
    best = float("inf")
    for _ in range(repeat):
        t0 = time.perf_counter()
        for _ in range(number):
            fn()
        best = min(best, (time.perf_counter() - t0) / number)
    return best


def wait_for_port(port: int, proc: subprocess.Popen, timeout_s: float = 60.0, log: Path | None = None) -> None:
    """Return once 127.0.0.1:``port`` accepts TCP connections; fail if ``proc`` exits or time runs out."""
    deadline = time.monotonic() + timeout_s
    while True:
        try:
            with socket.create_connection(("127.0.0.1", port), timeout=1.0):
                return
        except OSError:
            pass
        if proc.poll() is not None or time.monotonic() > deadline:
            why = f"exited with {proc.returncode}" if proc.poll() is not None else f"not up after {timeout_s:.0f} s"
            tail = log.read_text()[-2000:] if log is not None and log.exists() else ""
            raise RuntimeError(f"server on port {port} {why}" + (f":\n{tail}" if tail else ""))
        time.sleep(0.1)


def markdown_table(header: list[str], rows: list[list]) -> str:
    def fmt(v):
        return f"{v:,.2f}" if isinstance(v, float) else str(v)

    lines = ["| " + " | ".join(header) + " |", "|" + "|".join("---" for _ in header) + "|"]
    lines += ["| " + " | ".join(fmt(v) for v in row) + " |" for row in rows]
    return "\n".join(lines)


def reproduce_command() -> str:
    module = Path(sys.argv[0]).stem
    return "python -m benchmarks." + module + "".join(" " + shlex.quote(a) for a in sys.argv[1:])


def report(title: str, header: list[str], rows: list[list], notes: list[str], json_path: str | None,
           extra: dict | None = None) -> None:
    """Print the table, notes, reproduce line and machine facts; optionally write them as JSON."""
    facts = machine_facts()
    command = reproduce_command()
    if json_path:
        path = Path(json_path)
        path.parent.mkdir(parents=True, exist_ok=True)
        doc = {"title": title, "header": header, "rows": rows, "notes": notes, "reproduce": command,
               "machine": facts, **(extra or {})}
        path.write_text(json.dumps(doc, indent=1) + "\n")
    print(f"## {title}\n")
    print(markdown_table(header, rows))
    print()
    for note in notes:
        print(note)
    print(f"reproduce: {command}")
    print("machine: " + ", ".join(f"{k}={v}" for k, v in facts.items()))
    if json_path:
        print(f"wrote {json_path}")
