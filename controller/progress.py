"""Progress of one map or graph call, drawn in the caller: a tqdm bar, the caller's own tqdm,
or a callable.

The figures come from the server's JOB_PROGRESS messages (at most a few a second per job, sent
only for calls that asked with WATCH), so the bar counts items as nodes finish them, not as
the caller consumes results; a task's ``report_progress`` moves it before its chunk returns.
When the call ends the run sets the final figures it knows itself (every item on success).
"""

from __future__ import annotations

from typing import Any, Callable, Dict, List, Optional, Tuple

#: ``progress="tasks"`` on a graph call: one bar per ``@task`` name.
PER_TASK = "tasks"


def _num(x: float) -> float:
    """``x`` as an int when it is whole (so bars read ``3/10``, not ``3.0/10``)."""
    return int(x) if float(x).is_integer() else round(x, 2)


def _per_task(spec: Any) -> bool:
    return isinstance(spec, str) and spec == PER_TASK


def _is_tqdm(obj: Any) -> bool:
    return hasattr(obj, "update") and hasattr(obj, "n") and hasattr(obj, "set_postfix")


def wanted(spec: Any, default: bool) -> Any:
    """The progress spec a call uses: its own ``progress=``, or ``True`` when it passed None
    and ``ACHILLES_PROGRESS`` is on; None for no progress."""
    if spec is None:
        return True if default else None
    if spec is False:
        return None
    if spec is True or _per_task(spec) or callable(spec) or _is_tqdm(spec):
        return spec
    raise TypeError("progress= takes True, False, 'tasks' (graphs), a tqdm bar or a callable "
                    f"(done, total), not {spec!r}")


class _Bar:
    """A tqdm bar: ours (closed at the end) or the caller's (left open, refreshed)."""

    def __init__(self, bar: Any, owned: bool) -> None:
        self.bar = bar
        self.owned = owned
        self.postfix: Dict[str, int] = {}

    def show(self, n: float, total: Optional[int], postfix: Dict[str, int]) -> None:
        bar = self.bar
        if total is not None and bar.total != total:
            bar.total = total
        delta = _num(n - bar.n)
        if postfix != self.postfix:
            self.postfix = postfix
            bar.set_postfix(postfix, refresh=not delta)
        if delta:
            bar.update(delta)

    def close(self) -> None:
        if self.owned:
            self.bar.close()
        else:
            self.bar.refresh()


class _Callback:
    """The caller's ``callable(done, total)``, called whenever either changes."""

    def __init__(self, func: Callable[[float, Optional[int]], Any]) -> None:
        self.func = func
        self.last: Optional[Tuple[float, Optional[int]]] = None

    def show(self, n: float, total: Optional[int], postfix: Dict[str, int]) -> None:
        if (n, total) != self.last:
            self.last = (n, total)
            self.func(n, total)

    def close(self) -> None:
        pass


def _new_bar(total: Optional[int], desc: str, unit: str, position: Optional[int] = None) -> _Bar:
    from tqdm.auto import tqdm

    return _Bar(tqdm(total=total, desc=desc, unit=unit, dynamic_ncols=True,
                     position=position), True)


class Progress:
    """The display of one call. :meth:`update` takes the latest figures (items done, failed,
    skipped, re-runs, and per ``@task`` name for graphs); :meth:`close` ends it (idempotent).

    Runs in the caller's thread (the thread that waits for the call's events)."""

    def __init__(self, spec: Any, total: Optional[int], desc: str, unit: str = "item",
                 names: Optional[Dict[str, int]] = None) -> None:
        self.total = total
        self.closed = False
        self.n: float = 0
        self.figures: Dict[str, int] = {"failed": 0, "skipped": 0, "retried": 0}
        self.per_name: Dict[str, _Bar] = {}
        self.display: Optional[Any] = None
        if _per_task(spec) and names:
            for i, (name, count) in enumerate(sorted(names.items())):
                self.per_name[name] = _new_bar(count, name, "task", position=i)
        elif spec is True or _per_task(spec):
            self.display = _new_bar(total, desc, unit)
        elif _is_tqdm(spec):
            self.display = _Bar(spec, False)
        else:
            self.display = _Callback(spec)
        self._show()

    def update(self, n: float, failed: int = 0, skipped: int = 0, retried: int = 0,
               by_name: Optional[Dict[str, List[int]]] = None, total: Optional[int] = None) -> None:
        """Show new figures (``n``: items settled; ``total`` if it became known)."""
        if self.closed:
            return
        self.n = max(0.0, n)
        if total is not None:
            self.total = total
        self.figures = {"failed": failed, "skipped": skipped, "retried": retried}
        for name, counts in (by_name or {}).items():
            bar = self.per_name.get(name)
            if bar is not None and len(counts) == 3:
                done, bad, count = (int(c) for c in counts)
                bar.show(done + bad, count, {"failed": bad} if bad else {})
        self._show()

    def _show(self) -> None:
        if self.display is not None:
            postfix = {k: v for k, v in self.figures.items() if v}
            self.display.show(_num(self.n), self.total, postfix)

    def close(self) -> None:
        """End the display: our bars are closed, the caller's refreshed."""
        if self.closed:
            return
        self.closed = True
        for bar in self.per_name.values():
            bar.close()
        if self.display is not None:
            self.display.close()
