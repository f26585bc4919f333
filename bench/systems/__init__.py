"""The systems compared: the raw limit, Celery, and Tidings embedded and on PostgreSQL."""
