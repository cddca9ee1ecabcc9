"""Admin operations as plans: named steps with an undo each, run by one shared runner.

If a step fails, the finished steps are undone in reverse order, so an operation is all
or nothing (VirtuaLinux's five-stage VC creation either completes or leaves no trace).
"""

from __future__ import annotations

import inspect
import logging
from collections.abc import Awaitable, Callable
from dataclasses import dataclass, field
from typing import Any

log = logging.getLogger("virtua.plan")

Action = Callable[[], Any | Awaitable[Any]]


@dataclass
class Step:
    name: str
    do: Action
    undo: Action | None = None


@dataclass
class Plan:
    title: str
    steps: list[Step] = field(default_factory=list)
    done: list[str] = field(default_factory=list)

    def add(self, name: str, do: Action, undo: Action | None = None) -> None:
        self.steps.append(Step(name, do, undo))

    def describe(self) -> list[str]:
        return [s.name for s in self.steps]

    async def run(self) -> None:
        finished: list[Step] = []
        for step in self.steps:
            try:
                await _call(step.do)
            except BaseException as e:
                log.warning("%s: step %r failed (%s); undoing %d step(s)", self.title, step.name, e, len(finished))
                for prev in reversed(finished):
                    if prev.undo is None:
                        continue
                    try:
                        await _call(prev.undo)
                    except Exception as undo_err:  # keep undoing the rest
                        log.error("%s: undo of %r failed: %s", self.title, prev.name, undo_err)
                raise
            finished.append(step)
            self.done.append(step.name)


async def _call(fn: Action) -> Any:
    result = fn()
    if inspect.isawaitable(result):
        result = await result
    return result
