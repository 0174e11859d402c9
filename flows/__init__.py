"""Prefect flows of mlforce: orchestration only; the work is done by plain mlforce functions."""
