"""Progress for long loops: a rich bar with rate and ETA on a terminal, a periodic line otherwise."""
from __future__ import annotations

import sys
import time
from typing import Iterable, Iterator, TypeVar

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn, TimeElapsedColumn, TimeRemainingColumn

T = TypeVar("T")
console = Console(stderr=True)


def track(items: Iterable[T], total: int, description: str, *, every_s: float = 30.0) -> Iterator[T]:
    """Yield ``items``; on a TTY show a transient bar with ETA, elsewhere print a line every ``every_s``."""
    if console.is_terminal:
        columns = (TextColumn("{task.description}"), BarColumn(), MofNCompleteColumn(),
                   TimeElapsedColumn(), TextColumn("eta"), TimeRemainingColumn())
        with Progress(*columns, console=console, transient=True) as bar:
            task = bar.add_task(description, total=total)
            for item in items:
                yield item
                bar.advance(task)
        return
    start = last = time.perf_counter()
    for i, item in enumerate(items, 1):
        yield item
        now = time.perf_counter()
        if now - last >= every_s and i < total:
            eta = (now - start) / i * (total - i)
            print(f"  {description}: {i}/{total}  eta {eta:.0f}s", file=sys.stderr, flush=True)
            last = now
