"""Account attributes from Segment group traits, the pure parts: decoding a group call into an
``account_traits`` event, the fold (mapped attributes only, newest call wins per attribute,
bounded, usage-neutral), the policy's checks, alerts of schema version 3 that carry them,
routing and the destination formats, and the alerts_data row."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import orjson
import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from churnsignal.errors import ConfigError
from churnsignal.notify import formats
from churnsignal.notify.routing import NotifyPolicy, Router, matches
from churnsignal.schemas import identity
from churnsignal.schemas.alerts import Alert, AlertReason
from churnsignal.schemas.decode import DecodeOptions, decode
from churnsignal.schemas.events import EVENT_ADAPTER
from churnsignal.schemas.results import Accepted, Skipped
from churnsignal.stream import packs
from churnsignal.stream.alerts import decide
from churnsignal.stream.attributes import AccountsPolicy
from churnsignal.stream.clock import PartitionClock
from churnsignal.stream.engine import apply_batch
from churnsignal.stream.fold import ALERTS, BILLING, SUPPORT, fold_step
from churnsignal.stream.policy import Alerting, Policy, load_policy
from churnsignal.stream.reasons import Reason, Score
from churnsignal.stream.rows import ALERT_COLUMNS, alert_row, daily_rows
from churnsignal.stream.state import DAY, AccountState
from churnsignal.stream.store import MemoryStateStore

NOW = 1_764_000_000.0
MAPPING = {"tier": "tier", "csm": "csm_owner"}
POLICY = Policy(accounts=AccountsPolicy(traits=MAPPING), alerting=Alerting(cooldown_hours=0))
OPTS = DecodeOptions(trait_keys=POLICY.accounts.trait_keys)


def iso(ts: float) -> str:
    return datetime.fromtimestamp(ts, tz=UTC).isoformat()


def group(traits: dict[str, Any], ts: float = NOW - 60, n: int = 1,
          **extra: Any) -> dict[str, Any]:
    return {"type": "group", "messageId": f"g{n}", "userId": "u1", "groupId": "acme",
            "traits": traits, "timestamp": iso(ts), **extra}


def traits_event(traits: dict[str, Any], ts: float, n: int) -> Any:
    result = decode(orjson.dumps(group(traits, ts, n)), OPTS, NOW)
    assert isinstance(result, Accepted), result
    return result.event


# --- decoding ---------------------------------------------------------------------------------

def test_a_group_call_with_mapped_traits_is_an_account_traits_event_and_keeps_its_links() -> None:
    call = group({"name": "Acme", "tier": "enterprise", "csm_owner": "ana@example.com",
                  "employees": 120}, anonymousId="anon-1")
    result = decode(orjson.dumps(call), OPTS, NOW)
    assert isinstance(result, Accepted), result
    event = result.event
    assert (event.type, event.account_id, event.event_id, event.user_id) == (
        "account_traits", "acme", "g1", "u1")
    # only the mapped trait keys: name and employees are not kept
    assert event.data.traits == {"csm_owner": "ana@example.com", "tier": "enterprise"}
    assert result.links == ((identity.segment_user("u1"), "acme"),
                            (identity.segment_anonymous("anon-1"), "acme"))


def test_group_calls_without_mapped_traits_stay_links_only() -> None:
    call = group({"name": "Acme", "tier": "enterprise"})
    links = ((identity.segment_user("u1"), "acme"),)
    # no mapping (the default): exactly as before
    assert decode(orjson.dumps(call), DecodeOptions(), NOW) == Skipped("segment_unused", links)
    # a mapping, but the call carries none of its keys
    other = group({"name": "Acme"})
    assert decode(orjson.dumps(other), OPTS, NOW) == Skipped("segment_unused", links)
    # no groupId: no account to carry them to (and no link either)
    nameless = {k: v for k, v in call.items() if k != "groupId"}
    assert decode(orjson.dumps(nameless), OPTS, NOW) == Skipped("segment_unused", ())
    # identify calls never carry account traits
    identify = {"type": "identify", "userId": "u1", "traits": {"tier": "x", "groupId": "acme"},
                "timestamp": iso(NOW)}
    assert decode(orjson.dumps(identify), OPTS, NOW) == Skipped("segment_unused", links)


def test_trait_values_are_bounded_text() -> None:
    keys = frozenset({"a", "b", "c", "d", "e", "f", "g"})
    call = group({"a": "x" * 500, "b": 42, "c": True, "d": None, "e": {"nested": 1},
                  "f": 2.5, "g": "  "})
    result = decode(orjson.dumps(call), DecodeOptions(trait_keys=keys), NOW)
    assert isinstance(result, Accepted), result
    assert result.event.data.traits == {"a": "x" * 64, "b": "42", "c": "true", "d": None,
                                        "e": None, "f": "2.5", "g": None}


def test_a_group_call_older_than_the_horizon_is_skipped_without_a_row() -> None:
    old = group({"tier": "enterprise"}, ts=NOW - 200 * DAY)
    result = decode(orjson.dumps(old), OPTS, NOW)
    assert isinstance(result, Skipped) and result.reason == "too_old"
    assert result.event is None  # not history for billing_events: nothing at all
    assert result.links == ((identity.segment_user("u1"), "acme"),)


# --- the fold ---------------------------------------------------------------------------------

def test_the_fold_keeps_mapped_attributes_and_nothing_else_changes() -> None:
    usage = {"event_id": "u1", "account_id": "acme", "type": "feature_used", "user_id": "u1",
             "occurred_at": iso(NOW - 2 * DAY), "data": {"feature": "api"}}
    before = apply_batch(None, "acme", [("usage/0", 1, packs.event_of(usage))], NOW,
                         POLICY).state
    kept = before.clone()
    event = traits_event({"tier": "enterprise", "csm_owner": "ana", "name": "Acme"}, NOW - 60, 2)
    out = apply_batch(before, "acme", [("usage/0", 2, event)], NOW, POLICY)
    state = out.state
    assert state.attributes == {"csm": "ana", "tier": "enterprise"}
    assert state.seq == kept.seq + 1
    # not activity: inactivity, the day buckets, first and last event all as they were
    assert (state.last_active, state.last_event, state.first_seen) == (
        kept.last_active, kept.last_event, kept.first_seen)
    assert state.days == kept.days
    assert daily_rows(state, out.days) == [
        (*row[:-1], state.seq) for row in daily_rows(kept, out.days)]


def test_account_traits_make_no_billing_support_or_daily_counts() -> None:
    store = MemoryStateStore(4)
    data = traits_event({"tier": "enterprise"}, NOW - 60, 1).model_dump(mode="json")
    result = fold_step(store, packs.decode(packs.encode(NOW, [["usage.events/0", 1, data]])),
                       0, 1, POLICY, PartitionClock())
    assert result.applied == 1 and not result.failures
    assert result.rows[BILLING] == [] and result.rows[SUPPORT] == []
    state = store.get("acme")
    assert state is not None and state.attributes == {"tier": "enterprise"}
    assert state.days == {} and state.last_active == 0.0 and state.last_event == 0.0


def test_the_newest_group_call_wins_per_attribute() -> None:
    state = AccountState("acme")
    items = [
        ("usage/0", 1, traits_event({"tier": "premium", "csm_owner": "bo"}, NOW - 100, 1)),
        # older, arriving later: it does not undo what the newer call said ...
        ("usage/0", 2, traits_event({"tier": "free", "csm_owner": "cy"}, NOW - 200, 2)),
    ]
    state = apply_batch(state, "acme", items, NOW, POLICY).state
    assert state.attributes == {"csm": "bo", "tier": "premium"}
    # ... a newer one that carries only the tier changes only the tier
    state = apply_batch(state, "acme", [
        ("usage/0", 3, traits_event({"tier": "enterprise"}, NOW - 50, 3))], NOW, POLICY).state
    assert state.attributes == {"csm": "bo", "tier": "enterprise"}
    # a null clears it, and an older call does not bring it back
    state = apply_batch(state, "acme", [
        ("usage/0", 4, traits_event({"csm_owner": None}, NOW - 40, 4)),
        ("usage/0", 5, traits_event({"csm_owner": "dee"}, NOW - 45, 5))], NOW, POLICY).state
    assert state.attributes == {"tier": "enterprise"}
    # a redelivered call is a duplicate: nothing changes
    again = apply_batch(state, "acme", [
        ("usage/0", 3, traits_event({"tier": "enterprise"}, NOW - 50, 3))], NOW, POLICY)
    assert again.duplicates == 1 and again.state.attributes == {"tier": "enterprise"}


def test_attributes_are_bounded_and_follow_the_mapping() -> None:
    wide = {f"a{i}": f"t{i}" for i in range(8)}
    policy = Policy(accounts=AccountsPolicy(traits=wide))
    traits = {f"t{i}": "v" * 100 for i in range(8)}
    event = canonical_traits(traits, NOW - 60, 1)
    state = apply_batch(None, "acme", [("usage/0", 1, event)], NOW, policy).state
    assert len(state.attributes) == 8 and {len(v) for v in state.attributes.values()} == {64}
    # the mapping shrinks: the next group call drops what it no longer names, and an alert
    # never carries an unmapped one meanwhile
    narrow = Policy(accounts=AccountsPolicy(traits={"a0": "t0"}))
    state = apply_batch(state, "acme", [("usage/0", 2, canonical_traits({"t0": "x"}, NOW - 30, 2))], NOW,
                        narrow).state
    assert state.attributes == {"a0": "x"} and set(state.attribute_times) == {"a0"}


def canonical_traits(traits: dict[str, Any], ts: float, n: int) -> Any:
    """A canonical account_traits event, as a producer may send it (any trait keys)."""
    return EVENT_ADAPTER.validate_python({
        "event_id": f"t{n}", "account_id": "acme", "type": "account_traits",
        "occurred_at": iso(ts), "data": {"traits": traits}})


def test_state_format_keeps_attributes_and_older_states_read_as_none() -> None:
    state = apply_batch(None, "acme", [
        ("usage/0", 1, traits_event({"tier": "enterprise"}, NOW - 60, 1))], NOW, POLICY).state
    raw = state.to_bytes()
    back = AccountState.from_bytes(raw)
    assert back == state and back.attributes == {"tier": "enterprise"}
    assert back.attribute_times == {"tier": NOW - 60}
    copy = state.clone()
    assert copy.attributes is not state.attributes
    assert copy.attribute_times is not state.attribute_times
    # a state without attributes is written as before: no new keys
    plain = orjson.loads(AccountState.json_of(AccountState("globex", seq=3).to_bytes()))
    assert "attributes" not in plain and "attribute_times" not in plain
    # and a stored state from before attributes (no such keys) reads as none
    older = orjson.loads(AccountState.json_of(raw))
    del older["attributes"], older["attribute_times"]
    assert AccountState.from_bytes(orjson.dumps(older)).attributes == {}


# --- the policy -------------------------------------------------------------------------------

def test_the_mapping_is_checked(tmp_path: Any) -> None:
    def invalid(text: str, match: str) -> None:
        path = tmp_path / "policy.yaml"
        path.write_text(text)
        with pytest.raises(ConfigError, match=match):
            load_policy(path)

    invalid("accounts:\n  traits: {" + ", ".join(f"a{i}: t{i}" for i in range(9)) + "}\n",
            "9 attributes; at most 8")
    invalid("accounts:\n  traits: {Tier: tier}\n", "attribute name 'Tier'")
    invalid("accounts:\n  traits: {plan: plan}\n", "'plan' is reserved")
    invalid("accounts:\n  traits: {tier: ''}\n", "trait key must be 1 to 64")
    invalid("accounts:\n  unknown: 1\n", "Extra inputs")
    # a route on an attribute the mapping does not name
    invalid("accounts:\n  traits: {tier: tier}\nnotify:\n  routes:\n"
            "    - {to: [slack], attributes: {csm: [ana]}}\n",
            "notify route 1: attribute 'csm' is not mapped in accounts.traits")
    invalid("accounts:\n  traits: {tier: tier}\nnotify:\n  routes:\n"
            "    - {to: [slack], attributes: {tier: []}}\n", "list at least one value")
    invalid("accounts:\n  traits: {tier: tier}\nnotify:\n  routes:\n"
            "    - {to: [slack], attributes: {tier: [" + "x" * 65 + "]}}\n", "can never match")
    good = tmp_path / "good.yaml"
    good.write_text("accounts:\n  traits: {tier: tier, csm: csm_owner}\nnotify:\n  routes:\n"
                    "    - {to: [slack], attributes: {tier: [enterprise, premium]}}\n")
    policy = load_policy(good)
    assert policy.accounts.trait_keys == {"tier", "csm_owner"}
    assert load_policy().accounts.traits == {}  # the default keeps nothing


# --- alerts and routing -----------------------------------------------------------------------

BURDEN = Reason("support_burden", 6, 60, "voluntary", "support_escalation", "6 open tickets")


def test_an_alert_carries_the_mapped_attributes() -> None:
    state = AccountState("acme", plan="scale", attributes={"tier": "enterprise", "old": "x"},
                         attribute_times={"tier": 1.0, "old": 1.0})
    alert = decide(state, Score(60, "high", (BURDEN,)), NOW, "e1", NOW, POLICY)
    assert alert is not None and alert.schema_version == 3
    assert alert.attributes == {"tier": "enterprise"}  # "old" is no longer mapped
    assert alert.plan == "scale"
    plain = decide(AccountState("globex"), Score(60, "high", (BURDEN,)), NOW, "e1", NOW,
                   Policy(alerting=Alerting(cooldown_hours=0)))
    assert plain is not None and plain.attributes is None
    assert alert_row(alert)[-2:] == ("scale", {"tier": "enterprise"})
    assert alert_row(plain)[-2:] == ("", {})
    assert ALERT_COLUMNS[-2:] == ("plan", "attributes")


def make_alert(attributes: dict[str, str] | None, kind: str = "escalated",
               band: str = "critical", n: int = 1) -> Alert:
    return Alert(alert_id=f"a{n}", account_id="acme", kind=kind, score=80, band=band,
                 previous_band="medium", reasons=[AlertReason(**BURDEN.as_dict())],
                 mrr_at_risk_cents=10_000, triggered_at=1.0, emitted_at=2.0,
                 policy_version="p", plan="scale", attributes=attributes)


def test_older_alert_versions_still_validate() -> None:
    doc = make_alert({"tier": "enterprise"}).model_dump(mode="json")
    v2 = {k: v for k, v in doc.items() if k != "attributes"} | {"schema_version": 2}
    v1 = {k: v for k, v in v2.items() if k != "plan"} | {"schema_version": 1}
    assert Alert.model_validate(v2).attributes is None
    assert Alert.model_validate(v1).plan is None
    assert Alert.model_validate(doc).attributes == {"tier": "enterprise"}


def test_routes_by_attributes() -> None:
    routes = NotifyPolicy.model_validate({"routes": [
        {"to": ["slack"], "attributes": {"tier": ["enterprise", "premium"]}},
        {"to": ["pagerduty"], "attributes": {"tier": ["enterprise"], "csm": ["ana"]},
         "bands": ["critical"]}]})
    by_tier = routes.routes[0]
    assert matches(by_tier, make_alert({"tier": "premium"}))
    assert not matches(by_tier, make_alert({"tier": "free"}))
    assert not matches(by_tier, make_alert(None))  # unknown: not matched
    both = routes.routes[1]
    assert matches(both, make_alert({"tier": "enterprise", "csm": "ana"}))
    assert not matches(both, make_alert({"tier": "enterprise", "csm": "bo"}))
    assert not matches(both, make_alert({"tier": "enterprise", "csm": "ana"}, band="high"))
    # values written as YAML numbers or booleans match the text the traits became
    typed = NotifyPolicy.model_validate({"routes": [
        {"to": ["slack"], "attributes": {"seats": [10, 20.5], "beta": [True]}}]}).routes[0]
    assert typed.attributes == {"seats": ["10", "20.5"], "beta": ["true"]}
    assert matches(typed, make_alert({"seats": "10", "beta": "true"}))
    assert not matches(typed, make_alert({"seats": "10", "beta": "false"}))
    # the de-escalation follows its escalation, whatever its attributes by then
    router = Router(routes.routes_to("slack"), "high")
    assert router.route(make_alert({"tier": "enterprise"}), 0)
    assert router.route(make_alert({"tier": "free"}, kind="deescalated", band="low", n=2), 0)
    assert not router.route(make_alert({"tier": "free"}, n=3), 0)


def test_formats_show_the_attributes() -> None:
    alert = make_alert({"tier": "enterprise", "csm": "<ana>"})
    labels = formats.alertmanager_labels(alert)
    assert labels["tier"] == "enterprise" and labels["csm"] == "<ana>"
    assert "plan" not in labels and formats.alertmanager_annotations(alert)["plan"] == "scale"
    # never over the format's own labels, never beyond the bounds
    odd = make_alert({"band": "x", "Bad-Name": "y", **{f"a{i}": "v" * 99 for i in range(9)}})
    odd_labels = formats.alertmanager_labels(odd)
    assert odd_labels["band"] == "critical" and "Bad-Name" not in odd_labels
    assert len(odd_labels) <= 5 + formats.MAX_FACTS
    assert all(len(v) <= 64 for v in odd_labels.values())
    assert formats.alertmanager_labels(make_alert(None)) == {
        "alertname": "ChurnRisk", "account_id": "acme", "band": "critical",
        "reason": "support_burden", "severity": "critical"}
    slack = formats.slack_message(alert, None)
    fields = [f["text"] for f in slack["blocks"][1]["fields"]]
    assert "*Account*\nplan: scale\ntier: enterprise\ncsm: &lt;ana&gt;" in fields
    pd = formats.pagerduty_event(alert, "k" * 32, "app", "high", None)
    assert pd is not None
    assert pd["payload"]["custom_details"]["account"] == {
        "plan": "scale", "tier": "enterprise", "csm": "<ana>"}


def test_a_pack_with_traits_then_escalation_alerts_with_them() -> None:
    """Through fold_step as the worker runs it: traits, then tickets that escalate."""
    signals = {"support_burden": {"weight": 100, "start": 0, "full": 10}}
    policy = Policy.model_validate({"accounts": {"traits": MAPPING},
                                    "signals": signals, "alerting": {"cooldown_hours": 0}})
    store = MemoryStateStore(4)
    traits = traits_event({"tier": "enterprise"}, NOW - 30, 1).model_dump(mode="json")
    tickets = [{"event_id": f"t{i}", "account_id": "acme", "type": "ticket_opened",
                "occurred_at": iso(NOW - 10), "data": {"ticket_id": f"k{i}"}}
               for i in range(6)]
    items = [["usage.events/0", 1, traits]] + [
        ["support.events/0", i + 1, t] for i, t in enumerate(tickets)]
    result = fold_step(store, packs.decode(packs.encode(NOW, items)), 0, 1, policy,
                       PartitionClock())
    assert [a.alert.attributes for a in result.alerts] == [{"tier": "enterprise"}]
    assert [r[-1] for r in result.rows[ALERTS]] == [{"tier": "enterprise"}]


JSON_LEAF = st.none() | st.booleans() | st.integers(-2**63, 2**63 - 1) | st.floats() | st.text(max_size=300)
JSON_VALUE = st.recursive(JSON_LEAF, lambda inner: st.lists(inner, max_size=3)
                          | st.dictionaries(st.text(max_size=5), inner, max_size=3), max_leaves=6)


@settings(max_examples=300, deadline=None)
@given(traits=st.dictionaries(st.sampled_from(["tier", "csm_owner", "name", "x" * 70]),
                              JSON_VALUE, max_size=4) | JSON_VALUE,
       group_id=st.none() | st.text(max_size=30) | st.integers(-2**63, 2**63 - 1))
def test_any_group_call_decodes_to_a_bounded_event_or_a_skip(traits: Any, group_id: Any) -> None:
    call = {"type": "group", "userId": "u1", "groupId": group_id, "traits": traits,
            "timestamp": iso(NOW - 60)}
    result = decode(orjson.dumps(call, option=orjson.OPT_NON_STR_KEYS), OPTS, NOW)
    assert isinstance(result, Accepted | Skipped), result
    if isinstance(result, Accepted):
        event = result.event
        assert event.type == "account_traits" and set(event.data.traits) <= {"tier", "csm_owner"}
        assert all(v is None or 0 < len(v) <= 64 for v in event.data.traits.values())
        # what the ingest packs reads back as the same event, and folds
        again = EVENT_ADAPTER.validate_python(orjson.loads(orjson.dumps(
            event.model_dump(mode="json", exclude_none=True))))
        assert again == event
        state = apply_batch(None, event.account_id, [("usage/0", 1, again)], NOW, POLICY).state
        assert set(state.attributes) <= {"tier", "csm"}
        assert state.days == {} and state.last_active == 0.0
    else:
        assert result.reason == "segment_unused"
