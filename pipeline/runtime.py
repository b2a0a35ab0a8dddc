"""What a command or a worker process needs, opened lazily: configuration, store, Redis, processor.

The CLI keeps one per command; a Celery worker keeps one per worker process (opened
after the fork, so no engine or socket is shared between processes).
"""

from __future__ import annotations

from typing import TYPE_CHECKING

from pipeline.config import Config, load_config

if TYPE_CHECKING:
    import redis

    from pipeline.process import MailProcessor
    from pipeline.store.db import Store


class Runtime:
    def __init__(self, config_path: str | None) -> None:
        self.config_path = config_path
        self._config: Config | None = None
        self._store: Store | None = None
        self._redis: redis.Redis | None = None
        self._processor: MailProcessor | None = None

    @property
    def config(self) -> Config:
        if self._config is None:
            self._config = load_config(self.config_path)
        return self._config

    def store(self, *, migrate_sqlite: bool = True) -> "Store":
        if self._store is None:
            from pipeline.store.db import Store

            store = Store(self.config.database_url)
            if migrate_sqlite and store.dialect == "sqlite" and not store.at_newest():
                store.upgrade()  # the embedded default sets itself up; PostgreSQL takes `db upgrade`
            store.check()
            self._store = store
        return self._store

    def redis(self) -> "redis.Redis":
        if self._redis is None:
            from pipeline.process import check_redis, connect_redis

            client = connect_redis(self.config.redis_url)
            check_redis(client, self.config.redis_url)
            self._redis = client
        return self._redis

    def processor(self) -> "MailProcessor":
        if self._processor is None:
            from pipeline.process import MailProcessor

            self._processor = MailProcessor(self.config, self.store(), self.redis())
        return self._processor

    def close(self) -> None:
        if self._store is not None:
            self._store.dispose()
        if self._redis is not None:
            self._redis.close()
        self._store = self._redis = self._processor = None
