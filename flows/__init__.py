"""Prefect flows: compose tasks and branch on the gate. No ML logic, no I/O in flow bodies."""
