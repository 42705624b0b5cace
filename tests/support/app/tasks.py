"""The Celery app the tests' real workers run: `celery -A tasks worker` with this folder on PYTHONPATH."""

import os
import time

from celery import Celery

app = Celery("tasks", broker=os.environ["CELERY_BROKER_URL"])
app.conf.broker_connection_retry_on_startup = True
app.conf.worker_hijack_root_logger = False
if os.environ.get("CELERY_TRANSPORT_OPTIONS"):
    import json

    app.conf.broker_transport_options = json.loads(os.environ["CELERY_TRANSPORT_OPTIONS"])


@app.task
def add(x, y):
    return x + y


@app.task
def sleep(seconds):
    time.sleep(seconds)
    return seconds
