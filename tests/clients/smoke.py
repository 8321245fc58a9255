"""One call of every operation of the served OpenAPI document, through the Python client
openapi-python-client generated from it (tests/clients/run.sh).

Each answer must have the status the document names for it and be parsed into the
typed model the document gives that status: a `CommandAnswer`, a `LeadItem`, a
`Problem`. A model that kept fields its schema does not declare (its
`additional_properties`) fails too: the document must say everything the server sends.
Operations that need data first get it through the same client. Every operation the
document has must be called: one added without a call here fails the run.

    smoke.py --base-url URL --token TOKEN --document openapi.json
"""

import argparse
import datetime
import importlib
import json
import sys
import time
import uuid

import attrs

from annals_client import AuthenticatedClient
from annals_client import models as m
from annals_client.types import UNSET

parser = argparse.ArgumentParser()
parser.add_argument("--base-url", required=True)
parser.add_argument("--token", required=True)
parser.add_argument("--document", required=True)
args = parser.parse_args()

with open(args.document) as f:
    document = json.load(f)

# operationId -> (tag, {status: the model's name, or None for a free-form body})
operations = {}
for path, item in document["paths"].items():
    for method, operation in item.items():
        answers = {}
        for status, response in operation["responses"].items():
            schema = response.get("content", {}).get("application/json", {}).get(
                "schema"
            ) or response.get("content", {}).get("application/problem+json", {}).get(
                "schema"
            )
            ref = (schema or {}).get("$ref", "")
            answers[int(status)] = ref.rsplit("/", 1)[-1] or None
        operations[operation["operationId"]] = (operation["tags"][0], answers)

client = AuthenticatedClient(
    base_url=args.base_url, token=args.token, raise_on_unexpected_status=True
)
called = set()


def free_form(value):
    """A model standing for a free JSON object: it has no fields but the extra ones."""
    return [f.name for f in attrs.fields(type(value))] == ["additional_properties"]


def undeclared(value, where):
    """The fields the server sent that the document does not declare, anywhere inside."""
    found = []
    if attrs.has(type(value)):
        if not free_form(value):
            # (A schema that forbids other fields makes a model without the dict.)
            extra = getattr(value, "additional_properties", {})
            found += [f"{where}.{k}" for k in extra]
            for f in attrs.fields(type(value)):
                if f.name != "additional_properties":
                    found += undeclared(getattr(value, f.name), f"{where}.{f.name}")
    elif isinstance(value, list):
        for i, item in enumerate(value):
            found += undeclared(item, f"{where}[{i}]")
    return found


def call(operation_id, expected, *pos, **kwargs):
    """Calls one operation through its generated module; returns the parsed answer."""
    tag, answers = operations[operation_id]
    module = importlib.import_module(f"annals_client.api.{tag}.{operation_id}")
    response = module.sync_detailed(*pos, client=client, **kwargs)
    called.add(operation_id)
    where = f"{operation_id} ({expected})"
    if response.status_code != expected:
        sys.exit(
            f"{where}: answered {response.status_code}: {response.content[:500]!r}"
        )
    model = answers.get(expected)
    parsed = response.parsed
    if model is not None:
        if type(parsed).__name__ != model:
            sys.exit(f"{where}: parsed as {type(parsed).__name__}, not {model}")
        extra = undeclared(parsed, model)
        if extra:
            sys.exit(f"{where}: fields the document does not declare: {extra}")
    elif parsed is None:
        sys.exit(f"{where}: nothing parsed from {response.content[:200]!r}")
    return parsed


def until(what, check, timeout=20.0):
    """Polls `check` until it answers something true (a process acting, say)."""
    deadline = time.monotonic() + timeout
    while True:
        answer = check()
        if answer:
            return answer
        if time.monotonic() > deadline:
            sys.exit(f"timed out waiting for {what}")
        time.sleep(0.1)


def key():
    return str(uuid.uuid4())


eur = lambda minor: m.MoneyBody(currency="EUR", amount_minor=minor)  # noqa: E731
suffix = uuid.uuid4().hex[:8]

# Health and the document itself.
call("live", 200)
call("ready", 200)
assert "annals_" in call("metrics", 200)
assert call("openapi_document", 200)["openapi"].startswith("3.")

# The one error: an invalid email, parsed as a problem.
problem = call(
    "capture_lead",
    422,
    body=m.CaptureLead(email="not an email", name="Ada", source=m.LeadSource.WEB),
)
assert problem.status == 422 and problem.code, problem

# Routing rules: web leads of the pool go to Grace.
call(
    "set_routing",
    200,
    body=m.RoutingRulesBody(
        rules=[
            m.RoutingRuleBody(
                name="web",
                match=m.RuleMatchBody(sources=[m.LeadSource.WEB]),
                owners=["grace"],
            )
        ]
    ),
)
assert call("get_routing", 200).rules[0].owners == ["grace"]

# Leads: captured, scored, assigned, one converted and one disqualified.
ada = call(
    "capture_lead",
    201,
    body=m.CaptureLead(
        email=f"ada-{suffix}@example.com",
        name="Ada Lovelace",
        source=m.LeadSource.WEB,
        company="Analytical Engines",
    ),
    idempotency_key=key(),
)
bob = call(
    "capture_lead",
    201,
    body=m.CaptureLead(
        email=f"bob-{suffix}@example.com", name="Bob", source=m.LeadSource.EVENT
    ),
)
for _ in range(2):
    call(
        "record_signal",
        200,
        ada.id,
        body=m.RecordSignal(kind=m.SignalKind.DEMO_REQUEST),
    )
call("assign_lead", 200, ada.id, body=m.AssignLead(owner="grace"))
lead = call("get_lead", 200, ada.id, min_position=ada.position)
call("list_leads", 200, status=m.LeadStatus.QUALIFIED, source=m.LeadSource.WEB)
call("lead_history", 200, ada.id, version=1)
call("disqualify_lead", 200, bob.id, body=m.DisqualifyLead(reason="no budget"))
converted = call(
    "convert_lead",
    200,
    ada.id,
    body=m.ConvertLead(deal_name="Engines", amount=eur(120_000)),
)
assert converted.account_id and converted.deal_id, converted

# Erasure: a third lead, what is held about her, then erased; what is held is then
# gone (410, a problem), and her email may be captured again.
eve_email = f"eve-{suffix}@example.com"
eve = call(
    "capture_lead",
    201,
    body=m.CaptureLead(email=eve_email, name="Eve", source=m.LeadSource.PARTNER),
)
held = call("lead_personal_data", 200, eve.id)
assert held.email == eve_email and held.events, held
erased = call("erase_lead", 200, eve.id, body=m.EraseLead())
assert erased.events == ["LeadErased"], erased
gone = call("lead_personal_data", 410, eve.id)
assert gone.code == "erased", gone
again = call(
    "capture_lead",
    201,
    body=m.CaptureLead(email=eve_email, name="Eve", source=m.LeadSource.PARTNER),
)
shown = call("get_lead", 200, eve.id, min_position=erased.position)
assert shown.erased and shown.email is None and shown.name is None, shown

# Accounts.
account = call(
    "open_account",
    201,
    body=m.OpenAccount(name=f"Initech {suffix}", tier=m.AccountTier.STANDARD),
)
call("rename_account", 200, account.id, body=m.RenameAccount(name=f"Initrode {suffix}"))
tier = call(
    "set_account_tier", 200, account.id, body=m.SetAccountTier(tier=m.AccountTier.KEY)
)
call("get_account", 200, account.id, min_position=tier.position)
call("account_history", 200, account.id)

# Deals: one won through every stage change, one lost.
deal = call(
    "open_deal",
    201,
    body=m.OpenDeal(account_id=account.id, name="Support", amount=eur(1_000)),
)
call("advance_deal", 200, deal.id, body=m.AdvanceDeal(stage=m.DealStage.DEMO))
call("change_deal_amount", 200, deal.id, body=m.ChangeDealAmount(amount=eur(2_000)))
won = call("win_deal", 200, deal.id, body=m.WinDeal())
lost = call(
    "open_deal",
    201,
    body=m.OpenDeal(account_id=account.id, name="Training", amount=eur(500)),
)
call("lose_deal", 200, lost.id, body=m.LoseDeal(reason="went elsewhere"))
call("get_deal", 200, deal.id, min_position=won.position)
call("list_deals", 200, stage=m.DealStageOrOutcome.WON, account_id=account.id)
call("deal_history", 200, deal.id)

# Orders: one paid, which starts a subscription; one cancelled.
line = m.OrderLineBody(sku="SUPPORT", quantity=1, unit_price=eur(2_000), recurring=True)
order = call("place_order", 201, body=m.PlaceOrder(deal_id=deal.id, lines=[line]))
until(
    "the order's invoice",
    lambda: call("get_order", 200, order.id, min_position=order.position).status
    == m.OrderStatus.INVOICED,
)
call("pay_order", 200, order.id, body=m.PayOrder(amount=eur(2_000)))
subscription = until(
    "the order's subscription",
    lambda: call(
        "list_subscriptions",
        200,
        account_id=account.id,
        status=m.SubscriptionStatus.ACTIVE,
    ).items,
)[0]
call("get_subscription", 200, subscription.id)
call("expand_subscription", 200, subscription.id, body=m.ExpandMrr(mrr=eur(3_000)))
call(
    "contract_subscription",
    200,
    subscription.id,
    body=m.ContractMrr(mrr=m.PositiveMoneyBody(currency="EUR", amount_minor=2_500)),
)
churned = call(
    "churn_subscription",
    200,
    subscription.id,
    body=m.ChurnSubscription(reason="closed down"),
)
call("subscription_history", 200, subscription.id)
other = call("place_order", 201, body=m.PlaceOrder(deal_id=deal.id, lines=[line]))
call("cancel_order", 200, other.id, body=m.CancelOrder(reason="ordered twice"))
call("order_history", 200, order.id)
call("list_orders", 200, account_id=account.id, status=m.OrderStatus.CANCELLED)

# Analytics, once the read models have the churn.
call("funnel", 200, source=m.LeadSource.WEB, min_position=churned.position)
call("pipeline", 200, min_position=churned.position)
call("response_times", 200, to=datetime.datetime.now(datetime.timezone.utc))
revenue = call("revenue_figures", 200, currency="EUR", min_position=churned.position)
assert revenue.currencies and revenue.currencies[0].months, revenue

# The log.
call("log_events", 200, from_position=1, limit=10)
call("stream_events", 200, f"lead-{ada.id}", limit=10)

# Operators: the audit, the consumers, the projections; nothing is parked, so a retry
# or a skip of position 1 is refused as a problem.
assert call("audit_verify", 200).ok
call("list_consumers", 200)
call("list_parked", 200, "lead_board")
call("retry_parked", 404, "lead_board", 1)
call("skip_parked", 404, "lead_board", 1)
call("list_projections", 200)
call("verify_projection", 200, "lead_board")
call("rebuild_projection", 202, "lead_board")

missing = sorted(set(operations) - called)
if missing:
    sys.exit(f"operations of the document without a smoke call: {missing}")
print(f"smoke: {len(called)} operations called through the generated Python client")
