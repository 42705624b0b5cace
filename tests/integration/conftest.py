import pytest

from supervisor.config import BrokerConfig
from tests.support.brokers import delete_rabbitmq_queues
from tests.support.catchers import HttpCatcher
from tests.support.fleet import Fleet
from tests.support.workers import Worker, celery_app


@pytest.fixture
def catcher():
    """A local HTTP server recording the alerts Apprise posts to it (json:// channels)."""
    with HttpCatcher() as c:
        yield c


@pytest.fixture
def fleets():
    """`Fleet`s a test made: their supervisor and workers are stopped afterwards (last made first)."""
    made: list[Fleet] = []
    yield made
    for f in reversed(made):
        f.cleanup()


@pytest.fixture
def app(redis_url):
    """A Celery app on the test's Redis db, to ping workers and send tasks."""
    a = celery_app(redis_url)
    yield a
    a.close()


@pytest.fixture
def spawn(tmp_path, uid):
    """Start real workers on a broker; stop them (and delete their RabbitMQ queues) afterwards."""
    started: list[tuple[Worker, BrokerConfig, str]] = []

    def _spawn(broker: BrokerConfig, hostname: str, queues: str | None = None, pool: str = "solo") -> Worker:
        # never the default "celery" queue: on a shared broker it holds other tests' tasks
        queues = queues or f"{uid}-q"
        w = Worker(
            broker.url.get_secret_value(),
            hostname,
            queues=queues,
            pool=pool,
            transport_options=broker.transport_options or None,
            log=tmp_path / f"{hostname.replace('@', '_')}.log",
        )
        started.append((w, broker, queues))
        return w

    yield _spawn
    for w, _, _ in started:
        w.stop()
    amqp: dict[str, set[str]] = {}
    for _, broker, queues in started:
        if not broker.is_redis:
            amqp.setdefault(broker.url.get_secret_value(), set()).update(queues.split(","))
    for url, names in amqp.items():
        delete_rabbitmq_queues(url, names)
