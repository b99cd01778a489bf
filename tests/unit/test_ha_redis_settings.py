"""deployments/ha_stack/redis_server.py: the Redis settings every server process gets."""

from __future__ import annotations

from urllib.parse import unquote, urlsplit

from deployments.ha_stack.redis_server import redis_settings

URLS = ("PREFECT_SERVER_DOCKET_URL", "PREFECT_REDIS_WORKER_CLEANUP_QUEUE_URL")


def test_a_redis_password_reaches_every_setting_that_connects() -> None:
    """prefect_redis ignores the host and password settings where a URL is set: the Docket and
    clean-up queue URLs must carry the password themselves, or they cannot authenticate."""
    password = "p@ss/w:rd"
    settings = redis_settings("redis-host", 6379, password=password)
    assert settings["PREFECT_REDIS_MESSAGING_PASSWORD"] == password
    for name in URLS:
        url = urlsplit(settings[name])
        assert (url.hostname, url.port, unquote(url.password or "")) == ("redis-host", 6379, password), name
    assert settings["PREFECT_REDIS_WORKER_CLEANUP_QUEUE_URL"].endswith("@redis-host:6379/0")


def test_a_redis_without_a_password_gets_plain_urls() -> None:
    settings = redis_settings("127.0.0.1", 6400)
    assert "PREFECT_REDIS_MESSAGING_PASSWORD" not in settings
    assert [settings[name] for name in URLS] == ["redis://127.0.0.1:6400/1", "redis://127.0.0.1:6400/0"]
