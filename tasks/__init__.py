"""Prefect tasks, one module per outside system."""
