"""The app shell: command line, settings, web endpoints, metrics, logs, Kafka connections."""
