"""Summarize a py-spy ``--format raw`` (collapsed stacks) file.

    .venv/bin/python -m bench.profile_summary bench/profiles/relay_10000.txt [--top 25]

Prints the top functions by self time and by inclusive time, as a percentage
of all samples (with ``--idle`` recordings, samples where the thread waits in
epoll/select/locks are included and shown as such), and the split by thread.
"""

from __future__ import annotations

import argparse
import re
from collections import Counter
from pathlib import Path

_FRAME = re.compile(r"^(?P<func>.*?) \((?P<file>[^()]*?)(?::(?P<line>\d+))?\)$")


def _key(frame: str, with_line: bool) -> str:
    m = _FRAME.match(frame)
    if not m:
        return frame
    file = m.group("file")
    for marker in ("site-packages/", "lib/python3.11/", "/work/main/"):
        if marker in file:
            file = file.split(marker, 1)[1]
    if with_line and m.group("line"):
        return f"{m.group('func')} ({file}:{m.group('line')})"
    return f"{m.group('func')} ({file})"


def load(path: Path) -> list[tuple[list[str], int]]:
    stacks = []
    for line in path.read_text().splitlines():
        stack, _, count = line.rpartition(" ")
        if stack and count.isdigit():
            stacks.append((stack.split(";"), int(count)))
    return stacks


#: Leaf frames that mean "waiting", not working (recorded with py-spy --idle).
IDLE_LEAVES = (
    "get_events (trio/_core/_io_epoll.py",  # Trio's epoll_wait: the loop is idle
    "WorkerThread._work (trio/_core/_thread_cache.py",  # an idle worker thread
    "Connection.wait (psycopg/connection.py",  # waiting for PostgreSQL's reply
    "select (selectors.py",
    "wait (threading.py",
)


def _is_idle(leaf: str) -> bool:
    return any(marker in leaf for marker in IDLE_LEAVES)


def summarize(path: Path, top: int = 25) -> str:
    stacks = load(path)
    per_thread: Counter[str] = Counter()
    groups: dict[str, tuple[Counter[str], Counter[str], Counter[str]]] = {}
    for frames, count in stacks:
        head = frames[0]
        group = "main (Trio loop)" if "MainThread" in head else "worker threads"
        per_thread[head] += count
        self_t, incl, states = groups.setdefault(group, (Counter(), Counter(), Counter()))
        leaf = _key(frames[-1], with_line=True)
        if _is_idle(leaf):
            states["waiting in " + _key(frames[-1], with_line=False)] += count
            continue
        states["busy"] += count
        self_t[leaf] += count
        for f in {_key(f, with_line=False) for f in frames[1:]}:
            incl[f] += count
    threads = len(per_thread) or 1
    per = (sum(per_thread.values()) / threads) or 1  # samples per thread = wall time
    out = [f"{path}: {threads} threads, {per:.0f} samples each (100% = one thread's wall time)"]
    for group in sorted(groups):
        self_t, incl, states = groups[group]
        out.append(f"\n== {group}: state (% of one thread's wall time)")
        out += [f"  {100 * c / per:6.1f}%  {k}" for k, c in states.most_common(6)]
        out.append(f"-- {group}: top self time (busy samples)")
        out += [f"  {100 * c / per:6.1f}%  {f}" for f, c in self_t.most_common(top)]
        out.append(f"-- {group}: top inclusive time (busy samples)")
        out += [f"  {100 * c / per:6.1f}%  {f}" for f, c in incl.most_common(top)]
    return "\n".join(out)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__)
    p.add_argument("files", nargs="+", type=Path)
    p.add_argument("--top", type=int, default=25)
    a = p.parse_args()
    for f in a.files:
        print(summarize(f, a.top))
        print()


if __name__ == "__main__":
    main()
