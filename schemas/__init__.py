"""Canonical contract and provider adapters (no Kafka, no ClickHouse)."""
