import pytest

from supervisor.config import BrokerConfig
from tests.support.brokers import delete_rabbitmq_queues
from tests.support.workers import Worker


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
