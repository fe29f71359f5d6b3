"""`python -m looprl ...`: the CLI, as launchers run it (`torchrun --nproc_per_node 2 -m looprl train RECIPE`)."""

from looprl.cli import main

if __name__ == "__main__":
    raise SystemExit(main())
