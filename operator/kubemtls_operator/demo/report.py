"""What the demo observed, and how it says so: ``Scene``, ``Result`` and the ``Narrator``.

Kept apart from the scenes so that the end-to-end test and the CLI read the same values.
"""

from __future__ import annotations

import dataclasses
import time
from typing import Any, TextIO

__all__ = ["Narrator", "Result", "Scene"]


@dataclasses.dataclass
class Scene:
    """One outcome: ``pass``, ``fail`` or ``skip``, with a sentence and the facts behind it."""

    name: str
    status: str
    summary: str
    data: dict[str, Any] = dataclasses.field(default_factory=dict)


@dataclasses.dataclass
class Result:
    mode: str
    seconds: float = 0.0
    scenes: list[Scene] = dataclasses.field(default_factory=list)
    leftovers: list[str] = dataclasses.field(default_factory=list)
    workdir: str = ""
    run_id: str = ""
    pids: list[int] = dataclasses.field(default_factory=list)  # every process it started
    output: list[str] = dataclasses.field(default_factory=list)  # every line it printed

    @property
    def ok(self) -> bool:
        return bool(self.scenes) and all(s.status == "pass" for s in self.scenes)

    def scene(self, name: str) -> Scene:
        return next(s for s in self.scenes if s.name == name)


class Narrator:
    """Prints ``[ 12.3s] label    text`` lines, and records scenes."""

    def __init__(self, out: TextIO, result: Result) -> None:
        self.out, self.result, self.t0 = out, result, time.monotonic()

    def elapsed(self) -> float:
        return time.monotonic() - self.t0

    def _write(self, lines: list[str]) -> None:
        self.result.output += lines
        self.out.write("".join(line + "\n" for line in lines))
        self.out.flush()

    def say(self, label: str, text: str) -> None:
        self._write([f"[{self.elapsed():5.1f}s] {label:<10} {text}"])

    def block(self, text: str) -> None:
        self._write(["           " + line for line in text.splitlines()])

    def scene(self, scene: Scene) -> Scene:
        mark = {"pass": "PASS", "fail": "FAIL", "skip": "SKIP"}[scene.status]
        self.say(mark, f"{scene.name}: {scene.summary}")
        self.result.scenes.append(scene)
        return scene
