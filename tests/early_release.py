"""Session fixtures released as soon as this process has run every test that uses them.

pytest keeps a session fixture until the session ends. The shared Prefect stack of `make test`
(tests/conftest.py `prefect_stack`: two APIs, the services, nginx, Redis, a worker) serves three
modules that one xdist worker runs in its first four minutes, and then idled for the remaining ten
or so at about 6 % of a core (3.8 CPU-s a minute, measured alone on this 2-core machine): CPU that
the rest of the suite, CPU-bound on two cores, waited for.

A fixture listed when the plugin is made calls `hold(name, release)` once it is up; `release` then
runs right after the teardown of the last selected test that uses the fixture, provided the next
test is in no module of those tests (a module fixture built on it may still be up until its module
ends). Under xdist each worker counts the tests it collected, so a worker that was handed only some
of them never releases early and the fixture's own teardown at the session's end does it; `make
test` hands every user of such a fixture to one worker (tests/tiers.py SharedFixtureScheduling).
`release` must be safe to call again: the fixture's teardown calls it too.
"""

from __future__ import annotations

from collections.abc import Callable, Iterable, Iterator
from pathlib import Path

import pytest


class EarlyRelease:
    """A pytest plugin, one per session (registered on the config, so a session run inside a test
    has its own)."""

    NAME = "protein-early-release"

    def __init__(self, fixtures: Iterable[str]) -> None:
        self._fixtures = frozenset(fixtures)
        self._waiting: dict[str, set[str]] = {}  # fixture -> node ids of its users not yet torn down
        self._modules: dict[str, set[Path]] = {}  # fixture -> the modules its users are in
        self._held: dict[str, Callable[[], None]] = {}

    @classmethod
    def of(cls, config: pytest.Config) -> EarlyRelease:
        plugin = config.pluginmanager.get_plugin(cls.NAME)
        assert isinstance(plugin, cls), f"{cls.NAME} is not registered (tests/conftest.py pytest_configure)"
        return plugin

    def hold(self, fixture: str, release: Callable[[], None]) -> None:
        assert fixture in self._fixtures, f"{fixture} is not one of this plugin's fixtures {sorted(self._fixtures)}"
        self._held[fixture] = release

    @pytest.hookimpl(trylast=True)
    def pytest_collection_finish(self, session: pytest.Session) -> None:
        for name in self._fixtures:
            users = [item for item in session.items if name in getattr(item, "fixturenames", ())]
            self._waiting[name] = {item.nodeid for item in users}
            self._modules[name] = {item.path for item in users}

    @pytest.hookimpl(hookwrapper=True)
    def pytest_runtest_teardown(self, item: pytest.Item, nextitem: pytest.Item | None) -> Iterator[None]:
        yield  # the test's fixtures, and those of its module when the next test is in another, are down
        for name in self._fixtures:
            self._waiting.get(name, set()).discard(item.nodeid)
        for name in [name for name in self._held if self.unused(name, nextitem)]:
            self._held.pop(name)()

    def unused(self, fixture: str, nextitem: pytest.Item | None) -> bool:
        """No test left to use the fixture, and none of their modules' fixtures still up."""
        return not self._waiting.get(fixture) and (nextitem is None or nextitem.path not in self._modules[fixture])
