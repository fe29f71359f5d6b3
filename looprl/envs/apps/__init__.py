"""`looprl/Apps-v0`: an AppWorld-style world of apps (see `env.py` and docs/envs/apps.md)."""

from looprl.envs.apps.env import AppsEnv

__all__ = ["AppsEnv"]
