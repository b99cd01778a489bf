"""Prefect flows: compose tasks and branch on the gate. No ML logic, no I/O in flow bodies."""

import gc

from protein.process_gc import freeze_at_exit

# Each flow run is a process of its own (Prefect's process worker), and this runs once in it, after
# Prefect's engine imported Prefect: no collection walks Prefect's objects again, nor any library's
# when the process exits (protein/process_gc.py).
gc.freeze()
freeze_at_exit()
