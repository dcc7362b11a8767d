"""What every config group shares: the error a config that cannot run raises."""

from __future__ import annotations


class ConfigError(ValueError):
    """A configuration that cannot run; the message names the key and what to change."""
