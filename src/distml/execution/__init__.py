"""Executors: the work-queue pattern on real engines. See ``base.Executor``."""

from __future__ import annotations

from distml.execution.base import Executor, ProgressFactory, WorkItemError, make_executor

__all__ = ["Executor", "WorkItemError", "ProgressFactory", "make_executor"]
