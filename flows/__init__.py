"""Prefect flows: compose tasks and branch on the gate. No ML logic, no I/O in flow bodies."""

from protein.process_gc import freeze_at_exit

# Each flow run is a process of its own (Prefect's process worker): skip the collector's last walk
# over Prefect's, torch's and Great Expectations' objects when it exits (protein/process_gc.py).
freeze_at_exit()
