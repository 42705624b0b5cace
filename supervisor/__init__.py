"""celery-supervisor: keeps a Celery fleet alive."""

__version__ = "0.1.0"
