"""Thin Prefect tasks over the protein library: retries, timeouts, caching and artifacts."""
