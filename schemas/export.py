"""JSON Schema export of the contract, for producers (``churnsignal schemas export DIR``)."""

from __future__ import annotations

import json
from pathlib import Path

from churnsignal.schemas.alerts import Alert
from churnsignal.schemas.events import EVENT_ADAPTER


def documents() -> dict[str, dict[str, object]]:
    return {
        "event.schema.json": EVENT_ADAPTER.json_schema(),
        "alert.schema.json": Alert.model_json_schema(),
    }


def export(directory: Path) -> list[Path]:
    directory.mkdir(parents=True, exist_ok=True)
    written = []
    for name, doc in documents().items():
        path = directory / name
        path.write_text(json.dumps(doc, indent=2, sort_keys=True) + "\n")
        written.append(path)
    return written
