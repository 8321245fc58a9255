"""Schemathesis hooks for tests/fuzz/run.sh."""

import schemathesis
from schemathesis.specs.openapi.checks import positive_data_acceptance

# The refusals a request valid by the document may get because of what came before it,
# not because of its own shape: api.md prescribes them, and no document can rule them
# out (only state can). Each is told apart by its problem `code`, not by its status
# alone, so a 412 or a 422 for anything else still fails.
REFUSED_FOR_STATE = {
    # `If-Match` names a version other than the aggregate's.
    (412, "version-mismatch"),
    # The `Idempotency-Key` was used before with another request (the fuzzer sends
    # short keys like "0" many times).
    (422, "idempotency-key-reused"),
}


@schemathesis.check
def positive_data_acceptance_given_state(ctx, response, case):
    """`positive_data_acceptance`, except for the refusals in REFUSED_FOR_STATE.

    schemathesis's own check takes a list of statuses (404 and 409, which answer for the
    state, are in it by default); 412 and 422 cannot be added whole without hiding the
    422s of a document that says less than the server checks, which this check exists
    to find. It is run instead of the built-in one (run.sh excludes that one by name).
    """
    if response.status_code in {status for status, _ in REFUSED_FOR_STATE}:
        try:
            body = response.json()
        except Exception:
            body = None
        code = body.get("code") if isinstance(body, dict) else None
        if (response.status_code, code) in REFUSED_FOR_STATE:
            return None
    return positive_data_acceptance(ctx, response, case)
