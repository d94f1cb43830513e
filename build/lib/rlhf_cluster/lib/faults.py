"""Fault points: named moments inside a training step where a drill makes a fault happen on purpose, at that
boundary rather than at a wall-clock offset (docs/reliability.md, "Faults at every point of a step").

A process arms a point with an action; the first code to pass the point afterwards runs the action, once. Each
process (a trainer rank, the coordinator) has its own armed points. Unarmed, passing a point costs one test of
an empty dict.
"""

from __future__ import annotations

from collections.abc import Callable

# in the order a step meets them: inside a trainer rank's train_step (forward, backward, optimiser step), the
# rank's weight export, the engines loading what it exported (the coordinator's side), the checkpoint write
POINTS = ("before_forward", "before_optimizer_step", "after_optimizer_step", "export", "engine_load",
          "checkpoint_write")

_armed: dict[str, Callable[[], None]] = {}


def arm(point: str, action: Callable[[], None]) -> None:
    if point not in POINTS:
        raise ValueError(f"unknown fault point {point!r}; the points are {', '.join(POINTS)}")
    _armed[point] = action


def at(point: str) -> None:
    """Run the action armed at `point`, once."""
    if _armed:
        action = _armed.pop(point, None)
        if action is not None:
            action()
