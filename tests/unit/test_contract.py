"""The committed JSON Schemas are what the models export: producers can trust them."""

from __future__ import annotations

import json
from pathlib import Path

from churnsignal.schemas.export import documents

COMMITTED = Path(__file__).resolve().parents[2] / "schemas" / "json"


def test_committed_json_schemas_match_the_models() -> None:
    for name, doc in documents().items():
        committed = json.loads((COMMITTED / name).read_text())
        assert committed == json.loads(json.dumps(doc)), (
            f"schemas/json/{name} is stale: run `churnsignal schemas export schemas/json`")
