"""Errors the actor runtime raises to callers. Each names what a user needs to act on:
the actor, the method, the address and, for timeouts, the deadline."""

from __future__ import annotations


class ActorError(Exception):
    """Base of every error raised by the actor runtime."""

    code = "actor_error"

    def to_wire(self) -> dict:
        return {"code": self.code, "type": type(self).__name__, "message": str(self),
                "traceback": ""}


class RemoteError(ActorError):
    """The called method raised. ``remote_type`` is the exception's class name and
    ``remote_traceback`` the traceback text from the actor's process."""

    code = "remote"

    def __init__(self, remote_type: str, message: str, remote_traceback: str = ""):
        super().__init__(f"{remote_type}: {message}")
        self.remote_type = remote_type
        self.remote_message = message
        self.remote_traceback = remote_traceback

    def __str__(self) -> str:
        text = f"{self.remote_type}: {self.remote_message}"
        if self.remote_traceback:
            text += "\n--- remote traceback ---\n" + self.remote_traceback.rstrip()
        return text

    def to_wire(self) -> dict:
        return {"code": self.code, "type": self.remote_type, "message": self.remote_message,
                "traceback": self.remote_traceback}


class ActorDeadError(ActorError):
    """The actor stopped, crashed, or its process or node died before answering."""

    code = "dead"


class AskTimeout(ActorError, TimeoutError):
    """No answer before the deadline. The call was cancelled on the callee's side."""

    code = "timeout"


class MailboxFullError(ActorError):
    """The actor's mailbox stayed full until the sender's deadline."""

    code = "mailbox_full"


class UnknownActorError(ActorError):
    """No actor with that id or name lives at that address."""

    code = "unknown_actor"


class UnknownMethodError(ActorError):
    """The actor has no public async method of that name."""

    code = "unknown_method"


class BadRequestError(ActorError):
    """The message was malformed, too large, or the arguments did not fit the method."""

    code = "bad_request"


class SpawnError(ActorError):
    """An actor could not be started (its class failed to import, on_start raised, or its
    process did not come up before the deadline)."""

    code = "spawn"


_BY_CODE = {cls.code: cls for cls in (ActorDeadError, AskTimeout, MailboxFullError,
                                       UnknownActorError, UnknownMethodError,
                                       BadRequestError, SpawnError)}


def from_wire(body) -> ActorError:
    """Rebuild a typed error from an ERROR message body; a malformed body becomes a
    BadRequestError that says so."""
    if not isinstance(body, dict):
        return BadRequestError(f"malformed error reply: {body!r:.200}")
    code, message = body.get("code"), str(body.get("message", ""))
    if code == RemoteError.code:
        return RemoteError(str(body.get("type", "Exception")), message,
                           str(body.get("traceback", "")))
    return _BY_CODE.get(code, ActorError)(message)
