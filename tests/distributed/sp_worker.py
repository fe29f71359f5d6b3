"""Run by tests/distributed/test_sequence_parallel.py under `torchrun --nproc_per_node 2` (gloo).

    python sp_worker.py recipe RUN_ROOT   the tiny LOOP recipe twice, train.sequence_parallel=1 and 2
"""

from __future__ import annotations

import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[2]
sys.path.insert(0, str(ROOT))

from looprl.train.trainer import train  # noqa: E402
from tests.recipes.test_recipes import tiny_recipe  # noqa: E402


def recipe(root: Path) -> None:
    """The same run without and with its rows split over the two ranks (`off/t`, `on/t`)."""
    for name, degree in (("off", 1), ("on", 2)):
        train(tiny_recipe(root / name, train={"steps": 4, "save_every": 4, "sequence_parallel": degree},
                          optim={"lr": 2e-3}))


if __name__ == "__main__":
    recipe(Path(sys.argv[2]))
