"""Errors meant for users: the CLI prints their message and exits non-zero, with no traceback."""

from __future__ import annotations


class DistmlError(Exception):
    """A mistake in the user's input or environment, explained in words they can act on."""


class ConfigError(DistmlError):
    """The YAML spec (or a --set override) is invalid."""


class DataError(DistmlError):
    """The data set cannot be read or does not pass validation."""


class ArtifactError(DistmlError):
    """A model artifact or registry reference is missing or malformed."""
