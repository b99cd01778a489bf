"""Imported at start-up by every process of a multi-host test's worker "host" (its PYTHONPATH holds
only this folder). The hosts share this machine's virtualenv for the dependencies, but that
virtualenv's editable install maps `protein`, `tasks` and `flows` to the developer's checkout; a
real host has no checkout. Switching the editable finder off leaves the clone its pull step made
(the flow run's working directory) as the only place the project can come from, so a module
missing from the clone fails the run instead of loading silently from the checkout."""

import sys

sys.meta_path[:] = [finder for finder in sys.meta_path
                    if not getattr(finder, "__module__", "").startswith("__editable__")]
sys.path_hooks[:] = [hook for hook in sys.path_hooks
                     if not getattr(hook, "__module__", "").startswith("__editable__")]
