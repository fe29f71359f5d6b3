"""FlexSP's cost model and planner: sequence-parallel groups of heterogeneous degree, chosen per batch.

FlexSP (Wang et al., "Data-Centric and Heterogeneity-Adaptive Sequence Parallelism for Efficient
LLM Training", 2025) assigns each batch's sequences to sequence-parallel (Ulysses) groups whose
degrees sum to the ranks, minimising the slowest group's time under the per-device memory cap.
A group runs its sequences one after the other, so for a sequence of `s` tokens in a group of
degree `d` (FlexSP's eq. 1-3):

    compute(s, d) = (a1 * s^2 + a2 * s) / d + b
    comm(s, d)    = c * bytes(s, d) / bandwidth(d)     (0 at d = 1)
    memory(s, d)  = model_states + activations_per_token * s / d
    time(group)   = sum over its sequences of compute + comm;  time(plan) = max over groups

`bytes(s, d)` is what one device sends in the 4 all-to-alls a layer that Ulysses runs around
attention (q, k, v in; the output back), forward: `4 * layers * (s / d) * hidden * elem_bytes *
(d - 1) / d`; `c` counts the backward's (default 3: the backward runs them twice more). K/V heads
fewer than the query heads (GQA) make it smaller; that is not modelled.

Two planners, registered in `PLANNERS`: `heuristic` (each sequence's memory-minimum degree, then
longest-first packing of the sequences into a group layout, the layout improved by merging and
splitting groups) and `milp` (exact, `scipy.optimize.milp`, for small batches: it tells the
heuristic's gap). `static_plan` is the baseline of verl, AReaL and SkyRL: one degree for all.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field, fields
from pathlib import Path
from typing import Callable, Sequence

import numpy as np

DEFAULT_DEGREES = (1, 2, 4, 8, 16, 32, 64, 128, 256)


@dataclass(frozen=True)
class SPCostModel:
    """Per-sequence time and memory of a sequence-parallel group (FlexSP's cost model)."""

    a1: float  # seconds per token^2 (attention) of a forward+backward on one device
    a2: float  # seconds per token (the linear layers)
    b: float  # seconds per sequence (launches, the loss)
    hidden: int  # hidden size: the activations the all-to-alls move
    layers: int  # transformer layers
    bandwidth: dict[int, float] = field(default_factory=dict)  # degree -> all-to-all bytes/s a device
    model_state_bytes: float = 0.0  # parameters, gradients, optimizer states a device holds
    activation_bytes_per_token: float = 0.0  # activations a token leaves a device to hold for backward
    comm_coef: float = 3.0  # all-to-all rounds per forward round: forward + backward's two
    elem_bytes: int = 2  # bf16

    def __post_init__(self) -> None:
        for name in ("a1", "a2", "b", "model_state_bytes", "activation_bytes_per_token", "comm_coef"):
            if getattr(self, name) < 0:
                raise ValueError(f"Expect `{name}` >= 0, actually: {getattr(self, name)!r}")
        for degree, bw in self.bandwidth.items():
            if degree < 2 or bw <= 0:
                raise ValueError(f"Expect bandwidth {{degree >= 2: bytes/s > 0}}, actually: {degree}: {bw}")

    def compute_time(self, s: float, d: int) -> float:
        return (self.a1 * s * s + self.a2 * s) / d + self.b

    def alltoall_bytes(self, s: float, d: int) -> float:
        """Bytes one device sends in a forward's all-to-alls (4 a layer) for `s` tokens at degree `d`."""
        return 4 * self.layers * (s / d) * self.hidden * self.elem_bytes * (d - 1) / d

    def comm_time(self, s: float, d: int) -> float:
        if d == 1:
            return 0.0
        if d not in self.bandwidth:
            raise ValueError(f"No bandwidth for degree {d}; the cost model knows degrees {sorted(self.bandwidth)}")
        return self.comm_coef * self.alltoall_bytes(s, d) / self.bandwidth[d]

    def time(self, s: float, d: int) -> float:
        """Estimated forward+backward seconds of one sequence of `s` tokens in a group of degree `d`."""
        return self.compute_time(s, d) + self.comm_time(s, d)

    def memory(self, s: float, d: int) -> float:
        """Estimated peak bytes a device holds for a sequence of `s` tokens at degree `d`."""
        return self.model_state_bytes + self.activation_bytes_per_token * s / d

    def to_json(self) -> str:
        data = asdict(self)
        data["bandwidth"] = {str(k): v for k, v in self.bandwidth.items()}
        return json.dumps(data, indent=2, sort_keys=True)

    @classmethod
    def from_json(cls, text: str) -> SPCostModel:
        data = json.loads(text)
        known = {f.name for f in fields(cls)}
        unknown = sorted(set(data) - known)
        if unknown:
            raise ValueError(f"Unknown SPCostModel keys {unknown}; known: {sorted(known)}")
        data["bandwidth"] = {int(k): float(v) for k, v in data.get("bandwidth", {}).items()}
        return cls(**data)

    def save(self, path: str | Path) -> None:
        Path(path).write_text(self.to_json() + "\n")

    @classmethod
    def load(cls, path: str | Path) -> SPCostModel:
        return cls.from_json(Path(path).read_text())


def estimated_cost_model(hidden: int, layers: int, params: float, degrees: Sequence[int], *,
                         flops: float = 1e14, bandwidth: float = 2e10) -> SPCostModel:
    """A cost model from a model's size alone, for planning without a calibration: forward and
    backward at `flops` FLOP/s (6 x params a token for the linear layers, 6 x layers x hidden a
    token pair for causal attention) and every degree's all-to-all at `bandwidth` bytes/s. Only
    the ratios steer a plan; `calibrate` (bench/sequence_parallel.py --save) measures them.

    >>> m = estimated_cost_model(4096, 32, 7e9, (1, 2))  # a 7B model
    >>> round(m.time(32768, 1), 1), round(m.time(32768, 2), 1)  # 32k tokens: split, the all-to-all costs less
    (22.2, 12.4)
    """
    return SPCostModel(a1=6 * layers * hidden / flops, a2=6 * params / flops, b=0.0, hidden=hidden, layers=layers,
                       bandwidth={d: bandwidth for d in degrees if d > 1})


def fit_compute(lengths: Sequence[float], seconds: Sequence[float]) -> tuple[float, float, float]:
    """`(a1, a2, b)` of `seconds ~ a1 * s^2 + a2 * s + b` by least squares, clipped at 0.

    Args:
        lengths: Sequence lengths `s` measured (at least 3 distinct).
        seconds: The forward+backward seconds measured at each.
    """
    s = np.asarray(lengths, dtype=float)
    t = np.asarray(seconds, dtype=float)
    if s.shape != t.shape or len(np.unique(s)) < 3:
        raise ValueError(f"Expect >= 3 distinct lengths, one time each; actually: {len(np.unique(s))} lengths, "
                         f"shapes {s.shape} and {t.shape}")
    design = np.stack([s * s, s, np.ones_like(s)], axis=1)
    a1, a2, b = np.linalg.lstsq(design, t, rcond=None)[0]
    return max(float(a1), 0.0), max(float(a2), 0.0), max(float(b), 0.0)


def calibrate(measure: Callable[[int], float], lengths: Sequence[int], *, hidden: int, layers: int,
              bandwidth: dict[int, float], repeats: int = 1, **memory: float) -> SPCostModel:
    """A cost model whose compute coefficients are fit to `measure` (seconds of one forward+backward).

    Args:
        measure: `length -> seconds` of one forward+backward of one sequence on one device.
        lengths: The lengths to measure (a few, spread over the range planned for).
        hidden, layers: The model's shape (the all-to-all volume).
        bandwidth: Degree -> all-to-all bytes/s a device, measured elsewhere or given.
        repeats: Measurements a length; the fastest counts (the others met other load).
        **memory: `model_state_bytes`, `activation_bytes_per_token`, passed on.
    """
    seconds = [min(measure(s) for _ in range(repeats)) for s in lengths]
    a1, a2, b = fit_compute(lengths, seconds)
    return SPCostModel(a1=a1, a2=a2, b=b, hidden=hidden, layers=layers, bandwidth=bandwidth, **memory)


def forward_backward_timer(model, vocab_size: int, seed: int = 0) -> Callable[[int], float]:
    """`length -> seconds` of one forward+backward of `model` (an HF causal LM) on random tokens."""
    import torch

    gen = torch.Generator().manual_seed(seed)
    device = next(model.parameters()).device
    sync = torch.cuda.synchronize if device.type == "cuda" else (lambda: None)  # CUDA runs asynchronously

    def measure(length: int) -> float:
        ids = torch.randint(0, vocab_size, (1, length), generator=gen).to(device)
        model.zero_grad(set_to_none=True)
        sync()
        start = time.perf_counter()
        logits = model(input_ids=ids).logits  # (1, L, V)
        logits.float().logsumexp(-1).mean().backward()
        sync()
        return time.perf_counter() - start

    return measure


@dataclass(frozen=True)
class Group:
    """One sequence-parallel group: its degree (ranks) and the sequences it runs, by index."""

    degree: int
    sequences: tuple[int, ...]


@dataclass(frozen=True)
class Plan:
    """Sequence-parallel groups for one batch; `time` is the slowest group's estimated seconds."""

    groups: tuple[Group, ...]
    group_times: tuple[float, ...]
    method: str
    optimal: bool = False  # proven optimal (the MILP solved to its gap)

    @property
    def time(self) -> float:
        return max(self.group_times)

    @property
    def degrees(self) -> tuple[int, ...]:
        return tuple(g.degree for g in self.groups)


def _check(lengths: Sequence[int], world_size: int, degrees: Sequence[int]) -> tuple[int, ...]:
    """The usable degrees (sorted, <= world_size); raises if the inputs admit no plan."""
    if world_size < 1:
        raise ValueError(f"Expect `world_size` >= 1, actually: {world_size!r}")
    if not lengths or min(lengths) < 1:
        raise ValueError(f"Expect a non-empty batch of positive lengths, actually: {list(lengths)[:8]!r}")
    if not degrees or min(degrees) < 1:
        raise ValueError(f"Expect positive degrees, actually: {degrees!r}")
    usable = tuple(sorted({d for d in degrees if d <= world_size}))
    if _decompose(world_size, usable) is None:
        raise ValueError(f"world_size {world_size} is not a sum of the degrees {tuple(degrees)}")
    return usable


def _decompose(total: int, degrees: Sequence[int]) -> list[int] | None:
    """Degrees summing to `total`, largest first where possible; None if there are none."""
    reach: dict[int, int] = {0: 0}  # sum -> the degree last added to reach it
    for n in range(1, total + 1):
        for d in sorted(degrees, reverse=True):
            if n - d in reach:
                reach[n] = d
                break
    if total not in reach:
        return None
    out, n = [], total
    while n:
        out.append(reach[n])
        n -= reach[n]
    return out


def _tables(lengths, degrees, memory_cap: float, model: SPCostModel) -> tuple[np.ndarray, np.ndarray]:
    """`(times, fits)`, both (N, K): each sequence's time at each degree, and whether it fits the cap."""
    times = np.array([[model.time(s, d) for d in degrees] for s in lengths])  # (N, K)
    fits = np.array([[model.memory(s, d) <= memory_cap for d in degrees] for s in lengths])  # (N, K)
    for s, row in zip(lengths, fits):
        if not row.any():
            need = model.memory(s, max(degrees))
            raise ValueError(f"A sequence of {s} tokens fits no degree in {tuple(degrees)} under the memory cap "
                             f"{memory_cap:.4g} bytes (it needs {need:.4g} at degree {max(degrees)})")
    return times, fits


def _assign(layout: Sequence[int], times: np.ndarray, fits: np.ndarray, order: np.ndarray):
    """Longest-first packing of the sequences into groups of degree index `layout`.

    Each sequence, in `order`, goes to the group it fits that would finish earliest. Returns
    `(members, loads)`, or None when some sequence fits no group of the layout.
    """
    layout = np.asarray(layout)
    loads = np.zeros(len(layout))
    members: list[list[int]] = [[] for _ in layout]
    for i in order:
        finish = np.where(fits[i, layout], loads + times[i, layout], np.inf)
        g = int(np.argmin(finish))
        if not np.isfinite(finish[g]):
            return None
        loads[g] = finish[g]
        members[g].append(int(i))
    return members, loads


def _key(result) -> tuple[float, float]:
    return (np.inf, np.inf) if result is None else (float(result[1].max()), float(result[1].sum()))


def _moves(layout: tuple[int, ...], degrees: tuple[int, ...]):
    """Layouts one merge (two groups into one) or one split (one into two) away, over degree
    indices; then the bulk moves: every group of one degree split in halves, or merged in pairs."""
    index = {d: k for k, d in enumerate(degrees)}
    present = sorted(set(layout))
    out = []
    for x, a in enumerate(present):
        for b in present[x:]:
            merged = degrees[a] + degrees[b]
            if merged in index and (a != b or layout.count(a) >= 2):
                rest = list(layout)
                rest.remove(a)
                rest.remove(b)
                out.append(rest + [index[merged]])
        for part in degrees:
            if part <= degrees[a] - part and degrees[a] - part in index:
                rest = list(layout)
                rest.remove(a)
                out.append(rest + [index[part], index[degrees[a] - part]])
        count, half, double = layout.count(a), degrees[a] // 2, 2 * degrees[a]
        rest = [k for k in layout if k != a]
        if degrees[a] % 2 == 0 and half in index and count > 1:
            out.append(rest + [index[half]] * (2 * count))
        if double in index and count > 3:
            out.append(rest + [index[double]] * (count // 2) + [a] * (count % 2))
    return [tuple(sorted(m)) for m in out]


def heuristic_plan(lengths: Sequence[int], world_size: int, memory_cap: float, model: SPCostModel,
                   degrees: Sequence[int] = DEFAULT_DEGREES) -> Plan:
    """FlexSP-style heuristic: memory-minimum degrees, longest-first packing, layout local search.

    Starts from every static layout (all groups of one degree, the remainder filled) that holds the
    longest sequence, packs longest-first, then takes the best of the layouts a merge or a split of
    groups away while the slowest group's time (then the total) goes down. The first start is the
    static layout, so it is never worse than `static_plan`.
    """
    degrees = _check(lengths, world_size, degrees)
    times, fits = _tables(lengths, degrees, memory_cap, model)
    min_degree = fits.argmax(axis=1)  # (N,) index of each sequence's memory-minimum degree
    order = np.argsort(-np.asarray(lengths), kind="stable")  # longest first, as static_plan: same start, same plan
    seen: dict[tuple[int, ...], tuple[tuple[float, float], object]] = {}

    def evaluate(layout: tuple[int, ...]):
        if layout not in seen:
            result = _assign(layout, times, fits, order)
            seen[layout] = (_key(result), result)
        return seen[layout]

    best_layout = None
    for k, d in enumerate(degrees):
        fill = _decompose(world_size - d * (world_size // d), degrees)
        if k < min_degree.max() or fill is None:
            continue
        layout = tuple(sorted([k] * (world_size // d) + [degrees.index(f) for f in fill]))
        while True:  # best improvement; the key strictly decreases, so this ends
            step = min(_moves(layout, degrees), key=lambda m: evaluate(m)[0], default=None)
            if step is None or evaluate(step)[0] >= evaluate(layout)[0]:
                break
            layout = step
        if best_layout is None or evaluate(layout)[0] < evaluate(best_layout)[0]:
            best_layout = layout
    if best_layout is None or evaluate(best_layout)[1] is None:
        raise ValueError(f"No layout of degrees {degrees} summing to {world_size} holds every sequence")
    return _plan(best_layout, *evaluate(best_layout)[1], degrees, "heuristic")


def _plan(layout, members, loads, degrees, method: str, optimal: bool = False) -> Plan:
    groups = tuple(Group(degrees[k], tuple(m)) for k, m in zip(layout, members))
    return Plan(groups, tuple(float(x) for x in loads), method, optimal)


def static_plan(lengths: Sequence[int], world_size: int, degree: int, *, memory_cap: float,
                model: SPCostModel) -> Plan:
    """One degree for the whole batch (`world_size / degree` groups), sequences balanced longest-first.

    Raises:
        ValueError: `degree` does not divide `world_size`, or a sequence does not fit at `degree`.
    """
    if degree < 1 or world_size % degree:
        raise ValueError(f"Expect a degree that divides world_size {world_size}, actually: {degree!r}")
    _check(lengths, world_size, (degree,))
    times, fits = _tables(lengths, (degree,), memory_cap, model)
    order = np.argsort(-np.asarray(lengths), kind="stable")
    members, loads = _assign([0] * (world_size // degree), times, fits, order)
    return _plan([0] * (world_size // degree), members, loads, (degree,), f"static-{degree}")


def milp_plan(lengths: Sequence[int], world_size: int, memory_cap: float, model: SPCostModel,
              degrees: Sequence[int] = DEFAULT_DEGREES, time_limit: float = 30.0) -> Plan:
    """The exact plan, by a mixed-integer program (`scipy.optimize.milp`, HiGHS); for small batches.

    Slots: `world_size // d` candidate groups of each degree `d`, `y[g]` whether slot g is used,
    `x[i, g]` whether sequence i runs in it (only where it fits), `T` the makespan:
    min T  s.t.  sum_g x[i, g] = 1,  x[i, g] <= y[g],  sum_g d_g y[g] = world_size,
    sum_i time(i, d_g) x[i, g] <= T; slots of one degree are used in order (symmetry).

    Raises:
        RuntimeError: no solution within `time_limit` seconds. `Plan.optimal` is False when a
            solution was found but not proven optimal in time.
    """
    from scipy.optimize import Bounds, LinearConstraint, milp
    from scipy.sparse import lil_matrix

    degrees = _check(lengths, world_size, degrees)
    times, fits = _tables(lengths, degrees, memory_cap, model)
    slots = [k for k, d in enumerate(degrees) for _ in range(world_size // d)]  # degree index of each slot
    pairs = [(i, g) for i in range(len(lengths)) for g, k in enumerate(slots) if fits[i, k]]
    nx, ns = len(pairs), len(slots)
    n = nx + ns + 1  # x, y, T
    rows: list[tuple[dict[int, float], float, float]] = []
    for i in range(len(lengths)):
        rows.append(({p: 1.0 for p, (j, _) in enumerate(pairs) if j == i}, 1, 1))
    for p, (_, g) in enumerate(pairs):
        rows.append(({p: 1.0, nx + g: -1.0}, -np.inf, 0))
    rows.append(({nx + g: float(degrees[k]) for g, k in enumerate(slots)}, world_size, world_size))
    for g, k in enumerate(slots):
        load = {p: times[i, k] for p, (i, h) in enumerate(pairs) if h == g}
        rows.append(({**load, n - 1: -1.0}, -np.inf, 0))
        if g + 1 < ns and slots[g + 1] == k:
            rows.append(({nx + g + 1: 1.0, nx + g: -1.0}, -np.inf, 0))
    a = lil_matrix((len(rows), n))
    for r, (coefs, _, _) in enumerate(rows):
        for col, v in coefs.items():
            a[r, col] = v
    cost = np.zeros(n)
    cost[-1] = 1.0
    integrality = np.r_[np.ones(nx + ns), 0]
    upper = np.r_[np.ones(nx + ns), np.inf]
    res = milp(cost, constraints=LinearConstraint(a.tocsr(), [r[1] for r in rows], [r[2] for r in rows]),
               integrality=integrality, bounds=Bounds(np.zeros(n), upper),
               options={"time_limit": time_limit, "mip_rel_gap": 1e-9})
    if res.x is None:
        raise RuntimeError(f"The MILP found no plan in {time_limit} s ({len(lengths)} sequences, "
                           f"{ns} slots): {res.message}")
    used = [g for g in range(ns) if res.x[nx + g] > 0.5]
    members = {g: [] for g in used}
    for p, (i, g) in enumerate(pairs):
        if res.x[p] > 0.5:
            members[g].append(i)
    loads = [sum(times[i, slots[g]] for i in members[g]) for g in used]
    return _plan([slots[g] for g in used], [members[g] for g in used], loads, degrees, "milp",
                 optimal=res.status == 0)


def lower_bound(lengths: Sequence[int], world_size: int, memory_cap: float, model: SPCostModel,
                degrees: Sequence[int] = DEFAULT_DEGREES) -> float:
    """A bound no plan beats: the slowest sequence alone at its best degree, and the least
    rank-seconds of the batch (each sequence at its cheapest `degree * time`) spread over every rank."""
    degrees = _check(lengths, world_size, degrees)
    times, fits = _tables(lengths, degrees, memory_cap, model)
    alone = np.where(fits, times, np.inf).min(axis=1)  # (N,)
    rank_seconds = np.where(fits, times * np.asarray(degrees), np.inf).min(axis=1)  # (N,)
    return float(max(alone.max(), rank_seconds.sum() / world_size))


PLANNERS: dict[str, Callable[..., Plan]] = {"heuristic": heuristic_plan, "milp": milp_plan}


def plan(lengths: Sequence[int], world_size: int, memory_cap: float, model: SPCostModel,
         degrees: Sequence[int] = DEFAULT_DEGREES, method: str = "heuristic") -> Plan:
    """Assign every sequence to a sequence-parallel group, the degrees summing to `world_size`.

    Args:
        lengths: Tokens of each sequence of the batch.
        world_size: Ranks to cover with groups.
        memory_cap: Bytes a device may hold (checked per sequence: a group runs them in turn).
        model: The calibrated cost model.
        degrees: The group degrees allowed (those above `world_size` are dropped).
        method: A name in `PLANNERS`.

    Raises:
        ValueError: an unknown method; a sequence that fits no degree under the cap; a
            world_size that is no sum of the degrees.
    """
    if method not in PLANNERS:
        raise ValueError(f"Unknown planner {method!r}; known: {', '.join(PLANNERS)}")
    return PLANNERS[method](lengths, world_size, memory_cap, model, degrees)
