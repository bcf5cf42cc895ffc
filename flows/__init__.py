"""Prefect flows that run the DVC graph."""
