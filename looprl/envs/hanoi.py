"""`looprl/Hanoi-v0`: the Towers of Hanoi, one `move(from_peg, to_peg)` per tool call.

A task is a legal position of `num_disks` disks on pegs 0, 1 and 2 (every assignment of
disks to pegs is one, each peg holding its disks largest at the bottom) and a target
peg; the agent moves every disk onto the target peg. `start="standard"` poses the
classic puzzle (all disks on peg 0, target peg 2); `start="random"` draws a position
and a target uniformly among those with the largest disk off the target peg (the
others are smaller puzzles in disguise), which take 2**(n-1) to 2**n - 1 moves.
The train/test split is by content: a task is held out iff
`int(sha256("<pegs>:<target>").hexdigest(), 16) % 5 == 0`, except the classic puzzle,
which is always in the train split (so a random held-out task is never it).

A position is written as the pegs of disks 1 (smallest) to n: task id `hanoi:120:2`
has disk 1 on peg 1, disk 2 on peg 2 and disk 3 on peg 0, and asks for peg 2.
"""

from __future__ import annotations

import hashlib
from collections import deque
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, ClassVar

import numpy as np

from looprl.envs.base import Task, ToolEnv
from looprl.envs.parsing import format_tool_call
from looprl.envs.tools import Tool

NUM_PEGS = 3
MAX_DISKS = 20
MAX_WINDOW = 1000
MAX_DRAWS = 10_000
SPLITS = ("train", "test")
STARTS = ("random", "standard")
REWARD_SHAPINGS = (None, "progress")
STANDARD_TARGET = 2


def next_optimal_move(positions: Sequence[int], target: int) -> tuple[int, int] | None:
    """The first move of the shortest solution from any legal position, or None if solved.

    The largest disk not on its goal peg must move there once, after every smaller
    disk has gone to the third peg; so, from the largest disk down, each misplaced
    disk sends the smaller ones' goal to the third peg, and the smallest misplaced disk
    moves now (Hinz, "Shortest paths between regular states of the Tower of Hanoi", 1992).

    Args:
        positions: `positions[i]` is the peg (0-2) of disk `i + 1` (1 is the smallest).
        target: The peg every disk should end on.

    Returns:
        `(from_peg, to_peg)`, or None when every disk is on `target`.

    Example:
        >>> next_optimal_move([0, 0, 0], 2), next_optimal_move([2, 1, 0], 2)
        ((0, 2), (1, 2))
    """
    move, goal = None, target
    for disk in range(len(positions), 0, -1):
        peg = positions[disk - 1]
        if peg != goal:
            move = (peg, goal)
            goal = NUM_PEGS - peg - goal
    return move


def optimal_distance(positions: Sequence[int], target: int) -> int:
    """The fewest moves from `positions` to all disks on `target` (see `next_optimal_move`).

    Example:
        >>> optimal_distance([0] * 10, 2), optimal_distance([2, 2, 2], 2)
        (1023, 0)
    """
    total, goal = 0, target
    for disk in range(len(positions), 0, -1):
        peg = positions[disk - 1]
        if peg != goal:
            total += 2 ** (disk - 1)  # this disk's move plus the 2**(d-1) - 1 of the disks above
            goal = NUM_PEGS - peg - goal
    return total


def split_of(positions: str, target: int) -> str:
    """`"test"` for the held-out fifth of tasks (by sha256), else `"train"`.

    The classic puzzle (all disks on peg 0, target 2) is always `"train"`.
    """
    if positions == "0" * len(positions) and target == STANDARD_TARGET:
        return "train"
    digest = hashlib.sha256(f"{positions}:{target}".encode()).hexdigest()
    return "test" if int(digest, 16) % 5 == 0 else "train"


def format_pegs(pegs: Sequence[Sequence[int]]) -> str:
    """`"0:[3 2] 1:[] 2:[1]"`: each peg's disks from bottom to top."""
    return " ".join(f"{i}:[{' '.join(map(str, peg))}]" for i, peg in enumerate(pegs))


@dataclass(frozen=True)
class HanoiTask(Task):
    """A Hanoi task.

    Attributes:
        positions: The peg of disks 1 (smallest) to n, e.g. `(0, 0, 0)`.
        target: The peg to move every disk to.
    """

    positions: tuple[int, ...] = ()
    target: int = STANDARD_TARGET


class HanoiEnv(ToolEnv):
    """Move a tower of disks onto the target peg, one `move` call per disk moved.

    A turn may hold several `move` calls; they run in order and each is reported. An
    illegal move (a bad peg number, an empty peg, a disk onto a smaller one) changes
    nothing and says why. Every result ends with the pegs as they are now, so the
    agent never needs its history.

    Args:
        num_disks: Disks, 1 to 20.
        start: `"random"` (a uniform legal position and target, the largest disk off
            the target) or `"standard"` (all disks on peg 0, target peg 2; train split).
        split: `"train"` or `"test"` (the held-out fifth of tasks, by content).
        reward_shaping: None: 1.0 for solving, else 0.0. `"progress"`: each legal move
            earns `(placed after - placed before) / num_disks`, where placed counts the
            disks in their final place on the target peg from the bottom up (n, n-1,
            ...); a solve sums to 1.0, and taking a placed disk off costs what placing
            it earned.
        window: None, or 1 to 1000: append the last `window` move attempts and the
            current pegs to every observation, for agents that keep a short context.
        max_turns: Turns before truncation; None means `2 * (2**num_disks - 1) + 10`.

    Raises:
        ValueError: Any argument out of range, naming it and what was expected.
    """

    description: ClassVar[str] = (
        "Towers of Hanoi: move every disk to the target peg, one move call per disk."
    )
    reward_description: ClassVar[str] = (
        "1.0 when every disk is on the target peg, else 0.0; with "
        "reward_shaping='progress', each move earns the change in disks placed on the "
        "target peg from the bottom up, divided by the number of disks (sums to 1.0)."
    )
    system_prompt: ClassVar[str] = "Solve the Towers of Hanoi by calling move(from_peg, to_peg)."

    def __init__(
        self,
        num_disks: int = 3,
        start: str = "random",
        split: str = "train",
        reward_shaping: str | None = None,
        window: int | None = None,
        max_turns: int | None = None,
    ) -> None:
        _check_settings(num_disks, start, split, reward_shaping, window)
        self.num_disks = num_disks
        self.start = start
        self.split = split
        self.reward_shaping = reward_shaping
        self.window = window
        self._pegs: list[list[int]] = [[] for _ in range(NUM_PEGS)]
        self._moves = 0
        self._attempts = 0
        self._recent: deque[str] = deque(maxlen=window or 1)
        if max_turns is None:
            max_turns = 2 * (2**num_disks - 1) + 10
        super().__init__(tools=[Tool(self.move)], max_turns=max_turns)

    # --- the tool ----------------------------------------------------------------

    def move(self, from_peg: int, to_peg: int) -> str:
        """Move the top disk of one peg onto another peg.

        Args:
            from_peg: The peg to take the top disk from (0, 1 or 2).
            to_peg: The peg to put it on (0, 1 or 2).
        """
        self._attempts += 1
        problem = self._illegal(from_peg, to_peg)
        shown = "->".join(str(p) if 0 <= p < NUM_PEGS else "?" for p in (from_peg, to_peg))
        if problem is not None:
            reason, message = problem
            self._recent.append(f"#{self._attempts} {shown} illegal: {reason}")
            return f"Error: {message}. Pegs: {format_pegs(self._pegs)}"
        placed_before = self._placed()
        disk = self._pegs[from_peg].pop()
        self._pegs[to_peg].append(disk)
        self._moves += 1
        self._recent.append(f"#{self._attempts} {shown}")
        result = f"Moved disk {disk} from peg {from_peg} to peg {to_peg}."
        return f"{result} Pegs: {format_pegs(self._pegs)}{self._reward_move(placed_before)}"

    # --- ToolEnv -----------------------------------------------------------------

    @property
    def task(self) -> HanoiTask:
        return super().task  # type: ignore[return-value]

    def _generate_task(self, rng: np.random.Generator) -> HanoiTask:
        if self.start == "standard":
            return self._make_task((0,) * self.num_disks, STANDARD_TARGET)
        for _ in range(MAX_DRAWS):
            positions = tuple(int(p) for p in rng.integers(0, NUM_PEGS, size=self.num_disks))
            target = int(rng.integers(0, NUM_PEGS))
            if self._problem(positions, target) is None:
                return self._make_task(positions, target)
        raise RuntimeError(
            f"Found no {self.split!r} task in {MAX_DRAWS} draws with {self.num_disks} disks; "
            "use more disks or the other split"
        )

    def _task_from_id(self, task_id: str) -> HanoiTask:
        parts = task_id.split(":")
        if len(parts) != 3 or parts[0] != "hanoi":
            raise ValueError(
                f"Task id {task_id!r:.100} is not a Hanoi task id; "
                "expected 'hanoi:<peg of each disk, smallest first>:<target peg>'"
            )
        _, positions, target = parts
        problem = _id_problem(positions, target, self.num_disks)
        if problem is None:
            problem = self._problem(tuple(map(int, positions)), int(target))
        if problem is not None:
            raise ValueError(
                f"Task id {task_id!r:.100} cannot be posed by this environment: {problem}"
            )
        return self._make_task(tuple(map(int, positions)), int(target))

    def _start_episode(self, task: Task) -> None:
        assert isinstance(task, HanoiTask)
        self._pegs = _stack(task.positions)
        self._moves = 0
        self._attempts = 0
        self._recent = deque(maxlen=self.window or 1)

    def _run_turn(self, action: object) -> list[tuple[str, str]]:
        results = super()._run_turn(action)
        if self.window is not None:  # a summary that stands in for the turns before
            name, content = results[-1]
            results[-1] = (name, f"{content}\n{self._window_summary()}")
        return results

    def oracle_action(self) -> str:
        if self._terminated or self._truncated:
            raise RuntimeError("The episode is over: the oracle has no next action; call reset().")
        move = next_optimal_move(self._positions(), self.task.target)
        assert move is not None, "an unfinished episode is never solved"
        return format_tool_call("move", {"from_peg": move[0], "to_peg": move[1]})

    # --- state -------------------------------------------------------------------

    def _illegal(self, from_peg: int, to_peg: int) -> tuple[str, str] | None:
        """`(short reason, message)` if the move is illegal, else None."""
        for name, peg in (("from_peg", from_peg), ("to_peg", to_peg)):
            if not 0 <= peg < NUM_PEGS:
                return "no such peg", f"pegs are numbered 0, 1 and 2; got {name}={_short(peg)}"
        if from_peg == to_peg:
            return "same peg", f"from_peg and to_peg are both {from_peg}; move to another peg"
        if not self._pegs[from_peg]:
            return "empty peg", f"peg {from_peg} is empty; there is no disk to move"
        disk, pegs_to = self._pegs[from_peg][-1], self._pegs[to_peg]
        if pegs_to and pegs_to[-1] < disk:
            return "onto smaller", (
                f"disk {disk} cannot go on disk {pegs_to[-1]}, which is smaller; "
                "a disk goes only on a larger disk or an empty peg"
            )
        return None

    def _reward_move(self, placed_before: int) -> str:
        """Rewards a legal move; returns what to add to its result."""
        placed = self._placed()
        if self.reward_shaping == "progress":
            # No task starts with a disk placed (the largest is off the target), so
            # these sum to 1.0 at the solve, and a detour that undoes a placement to 0.
            self._add_reward((placed - placed_before) / self.num_disks)
        if placed < self.num_disks:
            return ""
        self._end_episode(reward=0.0 if self.reward_shaping else 1.0, success=True)
        return f". Solved in {self._moves} moves."

    def _placed(self) -> int:
        """Disks on the target peg in their final place: n, n-1, ... from the bottom up."""
        placed = 0
        for disk in self._pegs[self.task.target]:
            if disk != self.num_disks - placed:
                break
            placed += 1
        return placed

    def _positions(self) -> list[int]:
        positions = [0] * self.num_disks
        for peg, disks in enumerate(self._pegs):
            for disk in disks:
                positions[disk - 1] = peg
        return positions

    def _window_summary(self) -> str:
        recent = " | ".join(self._recent) if self._attempts else "none yet"
        shown = min(self._attempts, self.window or 0)
        return (
            f"Recent moves (last {shown} of {self._attempts}): {recent}\n"
            f"Now: {format_pegs(self._pegs)}; target peg {self.task.target}."
        )

    # --- tasks -------------------------------------------------------------------

    def _problem(self, positions: tuple[int, ...], target: int) -> str | None:
        """What stops this env from posing the task, or None."""
        encoded = "".join(map(str, positions))
        if self.start == "standard" and (encoded, target) != ("0" * self.num_disks, 2):
            return "start='standard' poses only the classic puzzle (all on peg 0, target 2)"
        if positions[-1] == target:  # then the largest disk never moves: a smaller puzzle
            return f"disk {self.num_disks}, the largest, is already on the target peg"
        if split_of(encoded, target) != self.split:
            return f"it belongs to the {split_of(encoded, target)!r} split, not {self.split!r}"
        return None

    def _make_task(self, positions: tuple[int, ...], target: int) -> HanoiTask:
        encoded = "".join(map(str, positions))
        n = self.num_disks
        prompt = (
            f"Towers of Hanoi with {n} disks, numbered 1 (smallest) to {n}, on pegs 0, 1 and 2.\n"
            f"Pegs (bottom to top): {format_pegs(_stack(positions))}\n"
            f"Move every disk to peg {target}, one at a time with move(from_peg, to_peg), "
            "which moves the top disk of from_peg; never put a disk on a smaller one."
        )
        return HanoiTask(
            task_id=f"hanoi:{encoded}:{target}", prompt=prompt, positions=positions, target=target
        )


def _stack(positions: Sequence[int]) -> list[list[int]]:
    """The pegs, bottom to top, for disks at `positions` (largest at the bottom)."""
    pegs: list[list[int]] = [[] for _ in range(NUM_PEGS)]
    for disk in range(len(positions), 0, -1):
        pegs[positions[disk - 1]].append(disk)
    return pegs


def _id_problem(positions: str, target: str, num_disks: int) -> str | None:
    if len(positions) != num_disks or not set(positions) <= set("012"):
        return f"expected {num_disks} peg digits (0, 1 or 2), one per disk, got {positions!r:.40}"
    if target not in ("0", "1", "2"):
        return f"expected a target peg 0, 1 or 2, got {target!r:.40}"
    return None


def _short(value: Any) -> str:
    text = str(value)
    return text if len(text) <= 12 else text[:9] + "..."


def _check_settings(
    num_disks: Any, start: Any, split: Any, reward_shaping: Any, window: Any
) -> None:
    if not isinstance(num_disks, int) or isinstance(num_disks, bool):
        raise ValueError(f"Expect `num_disks` to be an int, actually: {num_disks!r}")
    if not 1 <= num_disks <= MAX_DISKS:
        raise ValueError(
            f"Expect `num_disks` to be between 1 and {MAX_DISKS}, actually: {num_disks}"
        )
    if start not in STARTS:
        raise ValueError(f"Expect `start` to be 'random' or 'standard', actually: {start!r}")
    if split not in SPLITS:
        raise ValueError(f"Expect `split` to be 'train' or 'test', actually: {split!r}")
    if start == "standard" and split != "train":
        raise ValueError(
            "Expect split='train' with start='standard': the classic puzzle is a train task; "
            "hold out by num_disks, or use start='random' with split='test'"
        )
    if reward_shaping not in REWARD_SHAPINGS:
        raise ValueError(
            f"Expect `reward_shaping` to be None or 'progress', actually: {reward_shaping!r}"
        )
    if window is not None and (
        not isinstance(window, int) or isinstance(window, bool) or not 1 <= window <= MAX_WINDOW
    ):
        raise ValueError(
            f"Expect `window` to be None or an int from 1 to {MAX_WINDOW}, actually: {window!r}"
        )
