"""What a function answers when it cannot take a call."""

from __future__ import annotations

from layotto.host.function_instances import Response


class Unavailable(Exception):
    """No instance for this call: the function is stopped, or its pool is full and stays so."""

    def __init__(self, response: Response) -> None:
        super().__init__(response.body.decode(errors="replace").strip())
        self.response = response


def stopped_response() -> Response:
    return Response(503, body=b"function stopped\n")
