"""Queue and run: the Celery application, the job task and the embedded worker."""
