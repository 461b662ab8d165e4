"""Where a site's (and a user's) alerts go: Slurm mail, a webhook, a command (``notify:`` in a
site profile, ``~/.config/hpcdl/notify.yaml`` for a user). Here beside the sbatch options
because Slurm mail is one (``--mail-type``); the sending is :mod:`hpcdl.hpo.alerts`."""

from __future__ import annotations

import re
from typing import Annotated

from pydantic import AfterValidator, BaseModel, ConfigDict, Field

from hpcdl.config import JobTime
from hpcdl.script_values import OneLine


def _webhook(value: str) -> str:
    if not re.fullmatch(r"https?://[^\s/]+(/\S*)?", value):
        raise ValueError("must be an http:// or https:// URL on one line")
    if "@" in value.split("://", 1)[1].split("/", 1)[0]:
        # urllib does not send user:password@ (it fails on the host, with the password in
        # its message): put the secret in the path or query, as Slack's and Teams' URLs do
        raise ValueError("must not hold user:password@ (a secret goes in the URL's path)")
    return value


class Notify(BaseModel):
    """Where a sweep's alerts go (``finished``, ``failed``, ``stuck``): the site profile's
    ``notify:``, with the user's ``~/.config/hpcdl/notify.yaml`` over it (``hpcdl.hpo.alerts``)."""

    model_config = ConfigDict(extra="forbid", frozen=True)

    # The site's Slurm delivers mail (MailProg): a sweep's final job asks for END,FAIL mail.
    mail: bool = False
    mail_user: OneLine | None = None  # Slurm's default: the submitting user
    # A JSON POST per alert; the URL may hold a token (Slack's do): never logged whole.
    webhook: Annotated[str, AfterValidator(_webhook)] | None = None
    # argv run per alert (no shell), the alert's JSON on stdin, HPCDL_ALERT_* in its env.
    command: list[OneLine] = []
    timeout_s: float = Field(default=10.0, gt=0, le=120)
    # No progress this long (no trial claimed or ended, no epoch) while queued or running: stuck.
    stuck_after: JobTime | None = None
