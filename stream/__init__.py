"""Engagement state, scoring and alerts (pure), plus the Faust and Kafka edges."""
