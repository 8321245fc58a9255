"""Schemathesis hooks for tests/fuzz/run.sh."""

import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance

# The refusals a request valid by the document may get because of the server's state,
# not because of its own shape: api.md prescribes each, and no document can rule them
# out (only state can). Each is told apart by its status, its problem `code` and what
# the request carried, so a 412 or a 422 for anything else still fails.
def _refused_for_state(status, body, case):
    code = body.get("code") if isinstance(body, dict) else None
    detail = body.get("detail", "") if isinstance(body, dict) else ""
    query = case.query or {}
    # `If-Match` names a version other than the aggregate's.
    if (status, code) == (412, "version-mismatch"):
        return True
    # The `Idempotency-Key` was used before with another request (the fuzzer sends
    # short keys like "0" many times).
    if (status, code) == (422, "idempotency-key-reused"):
        return True
    # domain.md: a deal's new amount in another currency than the deal's is invalid
    # (422); which currency a deal has is state.
    if (status, code) == (422, "currency-mismatch"):
        return True
    # domain.md: routing rules have names unique among them, and a pool has each owner
    # once, both once trimmed: JSON Schema cannot say either (`uniqueItems` compares
    # whole items as sent, not one of their properties, nor trimmed text).
    if (status, code) == (422, "duplicate-value") and case.operation.path == "/admin/routing":
        return True
    # domain.md: a payment must be the order's total; which total an order has is state.
    if (status, code) == (422, "amount-mismatch") and case.operation.path == "/orders/{id}/pay":
        return True
    # An order's total (quantity × unit price, summed over its lines) above the largest
    # amount: JSON Schema bounds each number, not a sum of products.
    if (status, code) == (422, "number-too-large") and case.operation.path == "/orders":
        return True
    # api.md: what is held about an erased lead is gone for good (410 `erased`); which
    # lead is erased is state (the fuzzer erases leads too).
    if (status, code) == (410, "erased") and case.operation.path == "/leads/{id}/personal-data":
        return True
    # An analytics window whose `from` is not before its `to`: JSON Schema cannot
    # compare two parameters.
    if (
        (status, code) == (422, "invalid-window")
        and case.operation.path.startswith("/analytics/")
        and "from" in query
        and "to" in query
    ):
        return True
    # `min_position` is beyond the log's head: a position the log has not given out
    # (yet), the client's error at once; any int64 may be one the log reaches.
    if (
        (status, code) == (422, "invalid-parameter")
        and "min_position" in query
        and "beyond the log's last position" in detail
    ):
        return True
    return False


@schemathesis.check
def positive_data_acceptance_given_state(ctx, response, case):
    """`positive_data_acceptance`, except for the refusals `_refused_for_state` names.

    schemathesis's own check takes a list of statuses (404 and 409, which answer for the
    state, are in it by default); 410, 412 and 422 cannot be added whole without hiding the
    422s of a document that says less than the server checks, which this check exists
    to find. It is run instead of the built-in one (run.sh excludes that one by name).
    """
    if response.status_code in (410, 412, 422):
        try:
            body = response.json()
        except Exception:
            body = None
        if _refused_for_state(response.status_code, body, case):
            return None
    return positive_data_acceptance(ctx, response, case)


@schemathesis.check
def every_refusal_is_a_problem(ctx, response, case):
    """api.md: every error is an RFC 9457 problem (`application/problem+json`) with a
    stable `code`, path rejections included: a plain-text 400 from the router fails."""
    if response.status_code < 400:
        return None
    values = [v for k, v in response.headers.items() if k.lower() == "content-type"]
    content_type = values[0] if values else ""
    content_type = content_type[0] if isinstance(content_type, list) else content_type
    if not content_type.startswith("application/problem+json"):
        raise AssertionError(
            f"{response.status_code} answered as {content_type!r}, not a problem"
        )
    body = response.json()
    if not isinstance(body, dict) or not isinstance(body.get("code"), str):
        raise AssertionError(f"{response.status_code} problem without a code: {body!r}")
    return None
