"""Follow a job the daemon runs: a progress bar of its steps on a terminal, then its
result, or its error with the error's own category (exit code)."""

from __future__ import annotations

import sys
import time
from typing import Any

from virtua.cli.client import Client
from virtua.errors import from_dict

POLL = 0.25


def follow(client: Client, job_id: str, label: str, name_job: bool = True) -> dict[str, Any]:
    """Wait for the job to end; return its record, or raise its error (its message after
    "job ID: " with name_job, else as the operation run in this process would say it). The
    bar counts what the job reports (bytes of a flatten, nodes of a vc start), else its steps."""
    bar = None
    task = None
    try:
        if sys.stderr.isatty():
            from rich.progress import (
                BarColumn,
                Progress,
                TaskProgressColumn,
                TextColumn,
                TimeElapsedColumn,
            )

            bar = Progress(TextColumn("{task.description}"), BarColumn(), TaskProgressColumn(),
                           TextColumn("{task.fields[step]}"), TimeElapsedColumn(), transient=True)
            bar.start()
        while True:
            job: dict[str, Any] = client.call("job.show", id=job_id)
            if bar is not None:
                progress = job.get("progress") or {}
                if progress.get("unit") != "steps" and progress.get("total"):  # bytes, VMs
                    done, total = progress["done"], progress["total"]
                else:
                    steps = job["steps"]
                    done, total = sum(1 for s in steps if s["state"] == "done"), len(steps)
                if task is None:
                    task = bar.add_task(label, total=total, step="")
                bar.update(task, completed=done, total=total, step=job.get("step") or "")
            if job["state"] != "running":
                break
            time.sleep(POLL)
    finally:
        if bar is not None:
            bar.stop()
    if job["state"] != "done":
        raise from_dict({"error": job.get("error_kind") or "VirtuaError",
                         "message": (f"job {job_id}: " if name_job else "") + (job.get("error") or job["state"])})
    return job
