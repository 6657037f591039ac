"""A private broker and result store for one run of the suite.

Celery's suite publishes to the default queue (``celery``), purges it between tests and
looks at Redis keys and pub/sub channels, so a run must not share a RabbitMQ vhost or a Redis
database with anything else on the machine (other test runs, a developer's worker). Each run
gets:

* a fresh RabbitMQ vhost ``wasmq-celery-suite-<hex>`` (``rabbitmqctl add_vhost`` and
  ``set_permissions`` for the user of the AMQP URL), deleted at the end, which removes every
  queue and exchange the run declared;
* a Redis database that was empty when the run claimed it (a lock key set with ``NX`` and a
  TTL, so two concurrent runs never pick the same one), flushed at the end.

Both are created before Celery's ``conftest.py`` is imported, because it reads
``TEST_BROKER`` and ``TEST_BACKEND`` from the environment at import time.
"""

import os
import subprocess
import uuid
from dataclasses import dataclass
from urllib.parse import quote, urlsplit

import redis

#: The key that marks a Redis database as claimed by a run (its value is the run's token).
LOCK_KEY = "wasmq-celery-suite:claimed-by"
#: How long a claim outlives a run that was killed before it could clean up.
LOCK_TTL_SECONDS = 2 * 3600
#: Prefix of the vhosts a run creates, so a leftover one is recognisable.
VHOST_PREFIX = "wasmq-celery-suite-"


class SetupError(RuntimeError):
    """The private vhost or Redis database could not be set up."""


@dataclass
class AmqpServer:
    """Where RabbitMQ listens and whom to connect as (from ``amqp://user:pass@host:port``)."""

    user: str
    password: str
    host: str
    port: int

    @classmethod
    def parse(cls, url):
        parts = urlsplit(url)
        if parts.scheme not in ("amqp", "pyamqp"):
            raise SetupError(f"not an amqp:// URL: {url!r}")
        return cls(
            user=parts.username or "guest",
            password=parts.password or "guest",
            host=parts.hostname or "127.0.0.1",
            port=parts.port or 5672,
        )

    def url(self, scheme, vhost):
        """The URL of ``vhost`` on this server, for ``scheme`` (``amqp`` or ``pyamqp``)."""
        return (
            f"{scheme}://{quote(self.user, safe='')}:{quote(self.password, safe='')}"
            f"@{self.host}:{self.port}/{quote(vhost, safe='')}"
        )


@dataclass
class RedisServer:
    """Where Redis listens (from ``redis://host:port``)."""

    host: str
    port: int

    @classmethod
    def parse(cls, url):
        parts = urlsplit(url)
        if parts.scheme != "redis":
            raise SetupError(f"not a redis:// URL: {url!r}")
        return cls(host=parts.hostname or "127.0.0.1", port=parts.port or 6379)

    def client(self, db):
        return redis.Redis(host=self.host, port=self.port, db=db)

    def url(self, db):
        return f"redis://{self.host}:{self.port}/{db}"


def rabbitmqctl(*args):
    """Runs ``rabbitmqctl`` and raises with its output when it fails."""
    done = subprocess.run(
        ["rabbitmqctl", *args], capture_output=True, text=True, timeout=120, check=False
    )
    if done.returncode != 0:
        raise SetupError(
            f"rabbitmqctl {' '.join(args)} failed ({done.returncode}): "
            f"{done.stderr.strip() or done.stdout.strip()}"
        )


class SuiteEnvironment:
    """The private vhost and Redis database of one run; :meth:`destroy` removes both."""

    def __init__(self, amqp, redis_server, vhost, db, token):
        self.amqp = amqp
        self.redis = redis_server
        self.vhost = vhost
        self.db = db
        self._token = token

    @classmethod
    def create(cls, amqp_url, redis_url):
        amqp = AmqpServer.parse(amqp_url)
        redis_server = RedisServer.parse(redis_url)
        token = uuid.uuid4().hex
        db = claim_redis_db(redis_server, token)
        vhost = VHOST_PREFIX + token[:12]
        try:
            rabbitmqctl("add_vhost", vhost)
            rabbitmqctl("set_permissions", "-p", vhost, amqp.user, ".*", ".*", ".*")
        except Exception:
            release_redis_db(redis_server, db, token)
            try:
                rabbitmqctl("delete_vhost", vhost)
            except SetupError:
                pass
            raise
        return cls(amqp, redis_server, vhost, db, token)

    @property
    def celery_broker_url(self):
        """The broker URL for Celery clients (py-amqp transport)."""
        return self.amqp.url("pyamqp", self.vhost)

    @property
    def wasmq_broker_url(self):
        """The broker URL for ``wasmq worker --broker``."""
        return self.amqp.url("amqp", self.vhost)

    @property
    def backend_url(self):
        """The result backend URL, for Celery clients and wasmq alike."""
        return self.redis.url(self.db)

    def export(self):
        """Sets the variables Celery's ``conftest.py`` and ``tasks.py`` read."""
        os.environ["TEST_BROKER"] = self.celery_broker_url
        os.environ["TEST_BACKEND"] = self.backend_url
        # tasks.get_redis_connection() (used by tests to look at pub/sub channels) reads these.
        os.environ["REDIS_HOST"] = self.redis.host
        os.environ["REDIS_PORT"] = str(self.redis.port)

    def destroy(self):
        """Deletes the vhost (and with it every queue of the run) and empties the database."""
        errors = []
        try:
            rabbitmqctl("delete_vhost", self.vhost)
        except SetupError as e:
            errors.append(str(e))
        try:
            release_redis_db(self.redis, self.db, self._token)
        except redis.RedisError as e:
            errors.append(f"cannot flush redis db {self.db}: {e}")
        if errors:
            raise SetupError("; ".join(errors))


def claim_redis_db(server, token):
    """Claims the highest-numbered Redis database that holds nothing, and returns its number.

    Database 0 is never taken: it is everybody's default.
    """
    probe = server.client(0)
    try:
        count = int(probe.config_get("databases").get("databases", 16))
    except redis.ResponseError:
        # CONFIG may be disabled; 16 is Redis's default.
        count = 16
    except redis.RedisError as e:
        raise SetupError(f"cannot reach redis at {server.url(0)}: {e}") from e
    for db in range(count - 1, 0, -1):
        client = server.client(db)
        if not client.set(LOCK_KEY, token, nx=True, ex=LOCK_TTL_SECONDS):
            continue  # another run holds it
        if client.dbsize() == 1:
            return db
        # Someone else's data lives here: leave it alone.
        client.delete(LOCK_KEY)
    raise SetupError(
        f"no empty redis database to claim on {server.host}:{server.port} (1..{count - 1})"
    )


def release_redis_db(server, db, token):
    """Empties a database this run claimed (only if the claim is still this run's)."""
    client = server.client(db)
    owner = client.get(LOCK_KEY)
    if owner is None or owner.decode() == token:
        client.flushdb()
