"""The cluster's status as readable text tables (``achilles status`` and ``achilles top``)."""

from __future__ import annotations

import time
from typing import Any, Dict, List, Optional, Sequence

from achilles.core.logs import printable


def _bytes(n: Any) -> str:
    if not isinstance(n, (int, float)) or n <= 0:
        return "-"
    size = float(n)
    for unit in ("B", "KiB", "MiB", "GiB"):
        if size < 1024:
            return f"{size:.0f} {unit}" if unit == "B" else f"{size:.1f} {unit}"
        size /= 1024
    return f"{size:.1f} TiB"


def _duration(seconds: Any) -> str:
    if not isinstance(seconds, (int, float)) or seconds < 0:
        return "-"
    s = int(seconds)
    if s >= 86400:
        return f"{s // 86400}d{s % 86400 // 3600:02d}h"
    return f"{s // 3600}:{s % 3600 // 60:02d}:{s % 60:02d}"


def _rate(now: Any, before: Any, seconds: Optional[float]) -> str:
    if seconds is None or seconds <= 0 or not isinstance(now, (int, float)) \
            or not isinstance(before, (int, float)):
        return "-"
    return f"{max(0.0, now - before) / seconds:,.1f}"


def table(headers: Sequence[str], rows: Sequence[Sequence[Any]], right: Sequence[bool]) -> str:
    """Columns padded to their widest cell; ``right[i]`` right-aligns column ``i``."""
    cells = [[printable(str(c), 60) for c in row] for row in rows]
    widths = [max([len(h)] + [len(r[i]) for r in cells]) for i, h in enumerate(headers)]

    def line(values: Sequence[str]) -> str:
        return "  ".join(v.rjust(w) if r else v.ljust(w)
                         for v, w, r in zip(values, widths, right)).rstrip()

    return "\n".join([line(headers)] + [line(r) for r in cells])


def render(status: Dict[str, Any], where: str = "", previous: Optional[Dict[str, Any]] = None,
           seconds: Optional[float] = None, now: Optional[float] = None,
           rates: bool = False) -> str:
    """The nodes and jobs of ``status()`` as two tables under a summary line. With ``rates``
    (or a ``previous`` status), a RATE/s column shows items per second since ``previous``,
    taken ``seconds`` earlier (``-`` without one)."""
    now = time.time() if now is None else now
    nodes = list(status.get("nodes") or [])
    jobs = list(status.get("jobs") or [])
    before_nodes = {n.get("name"): n for n in (previous or {}).get("nodes") or []}
    before_jobs = {j.get("id"): j for j in (previous or {}).get("jobs") or []}
    rated = rates or previous is not None
    processes = sum(int(n.get("processes") or 0) for n in nodes)
    busy = sum(int(n.get("busy") or 0) for n in nodes)
    summary = (f"{len(nodes)} node(s), {processes} process(es), {busy} chunk(s) in flight, "
               f"{len(jobs)} job(s)")
    clock = time.strftime("%H:%M:%S", time.localtime(now))
    out = [f"achilles {where}  {summary}  {clock}".replace("achilles   ", "achilles  "), ""]

    node_headers = ["NODE", "HOST", "PROCS", "BUSY", "DONE"] + (["RATE/s"] if rated else []) + \
        ["LOAD", "MEM FREE", "RESOURCES", "UP"]
    node_rows = []
    for n in sorted(nodes, key=lambda n: str(n.get("name"))):
        load = n.get("load") or {}
        load1 = load.get("load1")
        cpus = load.get("cpus")
        resources = ",".join(f"{k}={v:g}" for k, v in sorted((n.get("resources") or {}).items())
                             if isinstance(v, (int, float)))
        row = [n.get("name", "?"), n.get("hostname") or n.get("address", "?"),
               n.get("processes", "?"), n.get("busy", "?"), f"{n.get('done', 0):,}"]
        if rated:
            row.append(_rate(n.get("done"), before_nodes.get(n.get("name"), {}).get("done"),
                             seconds))
        row += [f"{load1:.2f}/{cpus}" if isinstance(load1, (int, float)) and cpus else "-",
                _bytes(load.get("mem_available")), resources or "-",
                _duration(now - n["connected_since"])
                if isinstance(n.get("connected_since"), (int, float)) else "-"]
        node_rows.append(row)
    out.append(table(node_headers, node_rows,
                     [False, False, True, True, True] + ([True] if rated else [])
                     + [True, True, False, True]) if node_rows else "no nodes connected")
    out.append("")

    job_headers = ["JOB", "KIND", "FUNCTION", "OWNER", "DONE", "SENT", "FAILED", "QUEUED",
                   "RUNNING"] + (["RATE/s"] if rated else [])
    job_rows = []
    for j in jobs:
        row = [j.get("id", "?"), j.get("kind", "?"), j.get("function", "?"), j.get("owner", "?"),
               f"{j.get('done', 0):,}", f"{j.get('sent', 0):,}", j.get("failed", 0),
               j.get("queued", 0), j.get("running", "-")]
        if rated:
            row.append(_rate(j.get("done"), before_jobs.get(j.get("id"), {}).get("done"),
                             seconds))
        job_rows.append(row)
    out.append(table(job_headers, job_rows,
                     [False, False, False, False, True, True, True, True, True]
                     + ([True] if rated else [])) if job_rows else "no jobs running")
    return "\n".join(out)
