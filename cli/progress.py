"""A rich progress bar fed by tune's metrics records (the tune callback)."""

from __future__ import annotations

from rich.console import Console
from rich.progress import BarColumn, MofNCompleteColumn, Progress, TextColumn


def human_bytes(n: float | None) -> str:
    if not n:
        return "-"
    for unit in ("B", "KiB", "MiB", "GiB"):
        if n < 1024 or unit == "GiB":
            return f"{n:.0f} {unit}" if unit in ("B", "KiB") else f"{n:.1f} {unit}"
        n /= 1024
    return ""


def _duration(seconds: float) -> str:
    seconds = max(0, int(seconds))
    return f"{seconds // 3600}:{seconds // 60 % 60:02d}:{seconds % 60:02d}"


class TuneProgress:
    """Context manager and callback: `with TuneProgress(steps) as bar: tune(..., callback=bar)`."""

    def __init__(self, steps: int | None, max_time: float | None = None, console: Console | None = None):
        self.steps, self.max_time = steps, max_time
        self.started = False
        self.stopped_by: str | None = None  # set when tune stopped on SIGINT/SIGTERM
        self.bar = Progress(
            TextColumn("[bold]tune"), BarColumn(bar_width=20), MofNCompleteColumn(),
            TextColumn("loss {task.fields[loss]}"), TextColumn("{task.fields[fps]} fwd/s"),
            TextColumn("peak {task.fields[mem]}"), TextColumn("{task.fields[eval]}"),
            TextColumn("ETA {task.fields[eta]}"),
            console=console or Console(stderr=True),
        )
        self.task = self.bar.add_task("tune", total=steps, loss="-", fps="-", mem="-", eval="", eta="-")

    def __enter__(self) -> "TuneProgress":
        return self  # the bar starts with the first record, so errors while loading print no empty bar

    def __exit__(self, *exc) -> None:
        if self.started:
            self.bar.stop()

    def __call__(self, record: dict) -> None:
        if not self.started:
            self.bar.start()
            self.started = True
        if "stopped_by" in record:
            self.stopped_by = record["stopped_by"]
        if "eval_loss" in record:
            acc = f" acc {record['eval_accuracy']:.3f}" if "eval_accuracy" in record else ""
            self.bar.update(self.task, eval=f"eval {record['eval_loss']:.4f}{acc}")
        if "loss" not in record:
            return
        step, elapsed = record["step"], max(record.get("elapsed_s", 0.0), 1e-9)
        # step and elapsed_s count the whole run (resumes included), so the ETA survives a resume
        eta = elapsed / step * (self.steps - step) if self.steps else None
        if self.max_time:
            eta = min(eta if eta is not None else float("inf"), self.max_time - elapsed)
        self.bar.update(
            self.task, completed=step, loss=f"{record['loss']:.4f}", fps=f"{record['forwards'] / elapsed:.1f}",
            mem=human_bytes(record.get("peak_mem_bytes")), eta=_duration(eta) if eta is not None else "-",
        )
