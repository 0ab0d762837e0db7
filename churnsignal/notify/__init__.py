"""Alert delivery that loses nothing: each destination reads ``churn.alerts`` as its own Kafka
consumer group and commits an alert only once the destination took it (2xx) or refused it for
good (a 4xx other than 408/429, then it goes to ``churn.alerts.undeliverable``).

Pure parts (no Kafka, settings or metrics; unit-tested in milliseconds): ``backoff`` (retry
delays and the status classes), ``formats`` (bodies and signatures), ``destinations`` (what
each destination sends for an alert, and Alertmanager's set of firing accounts), ``routing``
(the policy's named destinations and routes, and which alerts each receives), ``ack`` (the
checks of an ack or snooze request). The edges:
``config`` (settings to destinations), ``delivery`` (the consumer loop of one destination),
``service`` (all of them, inside the worker or as ``churnsignal notify``).
"""
