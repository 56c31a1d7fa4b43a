"""serve.py's bound on the tokens in flight (`max_concurrent_tokens` in configs/serve.yaml).

A language-model request holds (prompt tokens + max_new_tokens) from the moment serve.py accepts
it until its answer has been sent (or its client went away): that many positions of key/value
cache while it decodes, a place in the workers' queue before. The sum over the requests in
flight, whatever their route (`/predict`, `/stream`, `/v1/completions`, `/v1/chat/completions`),
is kept at most `max_concurrent_tokens`, so that a burst of long requests cannot grow memory and
the queue until every request times out together. The request that would pass the bound is
answered at once, before it is queued, with 429 (retry later); one larger than the bound on its
own can never be served and gets 413. The requests in flight go on as if it had not come.

The count lives in serve.py's HTTP process (there is one, `num_api_servers=1`) and is only
touched from its event loop, so it needs no lock: the middleware (serve.CheckRequests) gives
each request a `Hold` in its ASGI scope, the route's checks `take` its tokens, and the
middleware gives them back when the app has answered.
"""

from __future__ import annotations

KEY = "max_concurrent_tokens"
# where a request's Hold travels from the middleware to the /v1 routes
SCOPE_KEY = "bigmodel.token_hold"


class OverBudget(Exception):
    """A request refused by the bound: its HTTP status (413 or 429) and message."""

    def __init__(self, status: int, message: str) -> None:
        super().__init__(message)
        self.status, self.message = status, message


class TokenBudget:
    """The tokens held by the requests in flight, at most `limit` (None: no bound, counted)."""

    def __init__(self, limit: int | None) -> None:
        self.limit, self.used = limit, 0

    def take(self, n: int) -> None:
        limit = self.limit
        if limit is not None and n > limit:
            raise OverBudget(
                413,
                f"this request needs {n} tokens (prompt + max_new_tokens) and this server's "
                f"{KEY}={limit} bounds the tokens of all requests in flight together; shorten "
                f"the prompt or ask for fewer new tokens (or serve with a larger {KEY})",
            )
        if limit is not None and self.used + n > limit:
            raise OverBudget(
                429,
                f"the server is busy: the requests in flight hold {self.used} of its {KEY}="
                f"{limit} tokens and this one needs {n} (prompt + max_new_tokens); retry "
                f"later or ask for fewer new tokens",
            )
        self.used += n


class Hold:
    """One request's share of the budget: taken by its route's checks, given back once."""

    def __init__(self, budget: TokenBudget) -> None:
        self.budget, self.n = budget, 0

    def take(self, n: int) -> None:
        self.budget.take(n)
        self.n += n

    def release(self) -> None:
        self.budget.used -= self.n
        self.n = 0
