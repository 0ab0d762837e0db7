"""`churnsignal gateway`: HTTP in (Segment-compatible tracking API, Stripe, Zendesk and
Intercom webhooks), Kafka out, 2xx only once Kafka acknowledged.

The pure parts (``verify``, ``segment_api``, ``webhooks``, ``body``) know nothing of Kafka,
settings or metrics and are unit-tested alone; ``producer`` and ``server`` are the edges."""
