"""Account attributes from Segment ``group`` traits: the policy's mapping and the fold (pure).

The policy's ``accounts.traits`` maps an attribute name to the trait key of group calls it is
read from (``{tier: tier, csm: csm_owner}``). Decoding keeps only those trait keys
(``DecodeOptions.trait_keys``) in an ``account_traits`` event; folding it sets the account's
attributes, per attribute the newest group call (by event time) that carries its trait
winning, a null or empty value clearing it. Nothing else of the state changes: a group call
is not activity. Alerts carry the mapped attributes, and routes may match on them.

Bounded: at most ``MAX_ATTRIBUTES`` attributes, values cut to ``MAX_VALUE`` characters.
No Kafka, settings or metrics.
"""

from __future__ import annotations

import re
from functools import cached_property
from typing import Final

from pydantic import BaseModel, ConfigDict, Field, field_validator

from churnsignal.schemas.segment import TRAIT_VALUE_MAX

MAX_ATTRIBUTES: Final = 8
MAX_VALUE: Final = TRAIT_VALUE_MAX
MAX_TRAIT_KEY: Final = 64
# An attribute name is also an Alertmanager label name and a ClickHouse map key.
ATTRIBUTE_NAME: Final = re.compile(r"[a-z][a-z0-9_]{0,31}")
# Names an alert or its Alertmanager labels already use for something else.
RESERVED: Final = frozenset({"plan", "account_id", "alertname", "band", "reason", "severity"})


class AccountsPolicy(BaseModel):
    """The policy's ``accounts`` section."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    traits: dict[str, str] = Field(
        default_factory=dict, description="Account attribute name -> the key in a Segment "
        f"group call's traits it is read from (at most {MAX_ATTRIBUTES}), e.g. {{tier: tier, "
        "csm: csm_owner}. Empty (the default): group traits are not kept.")

    @field_validator("traits")
    @classmethod
    def _bounded(cls, traits: dict[str, str]) -> dict[str, str]:
        if len(traits) > MAX_ATTRIBUTES:
            raise ValueError(f"{len(traits)} attributes; at most {MAX_ATTRIBUTES}")
        for name, key in traits.items():
            if not ATTRIBUTE_NAME.fullmatch(name):
                raise ValueError(f"attribute name {name!r}: a lower-case letter, then up to 31 "
                                 "lower-case letters, digits or _ (it is also an Alertmanager "
                                 "label)")
            if name in RESERVED:
                raise ValueError(f"attribute name {name!r} is reserved (the alert's or its "
                                 f"labels' own; reserved: {', '.join(sorted(RESERVED))})")
            if not key or len(key) > MAX_TRAIT_KEY:
                raise ValueError(f"attribute {name!r}: the trait key must be 1 to "
                                 f"{MAX_TRAIT_KEY} characters")
        return traits

    @cached_property
    def trait_keys(self) -> frozenset[str]:
        """The trait keys decoding keeps."""
        return frozenset(self.traits.values())


def apply_traits(attributes: dict[str, str], times: dict[str, float],
                 traits: dict[str, str | None], ts: float, mapping: dict[str, str]) -> None:
    """Fold one call's traits (trait key -> value) at event time ``ts`` into ``attributes``
    (name -> value) and ``times`` (name -> event time of the call that last set or cleared
    it): per attribute, an older call than the one that decided it changes nothing.
    Attributes the mapping no longer names are dropped."""
    for name in [n for n in times if n not in mapping]:
        del times[name]
    for name in [n for n in attributes if n not in mapping]:
        del attributes[name]
    for name, key in mapping.items():
        if key not in traits or ts < times.get(name, float("-inf")):
            continue
        times[name] = ts
        value = traits[key]
        value = value[:MAX_VALUE] if value else None
        if value is None:
            attributes.pop(name, None)
        else:
            attributes[name] = value


def mapped(attributes: dict[str, str], mapping: dict[str, str]) -> dict[str, str] | None:
    """What an alert carries: the attributes the policy maps (sorted by name), None when
    there are none."""
    if not attributes or not mapping:
        return None
    return {n: attributes[n] for n in sorted(attributes) if n in mapping} or None
