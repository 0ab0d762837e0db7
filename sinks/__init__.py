"""ClickHouse DDL, batched idempotent writer and saved queries."""
