"""The error every part of :mod:`hybridvision.deploy` raises for a problem with the user's input."""

from __future__ import annotations

__all__ = ["UserError"]


class UserError(Exception):
    """A problem with the user's input (file, value, model); the message is one line naming it."""
