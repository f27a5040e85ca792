"""Loader map functions for tests."""

from __future__ import annotations


def identity(x, y):
    return x, y
