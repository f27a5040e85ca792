"""Orchestration: the stage pipeline and its report."""
