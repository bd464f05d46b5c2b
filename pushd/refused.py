"""A refusal pushd answers with: an HTTP status, a code of the contract and a
sentence. Credentials (pushd.auth.AuthError) and the producer API
(pushd.web.errors.ApiError) raise kinds of their own."""

from __future__ import annotations


class Refused(Exception):
    def __init__(self, status: int, code: str, message: str) -> None:
        super().__init__(message)
        self.status = status
        self.code = code
        self.message = message
