"""Mail Kiln sends (address checks, password resets, invitations, invoices): through the SMTP
server `KILN_SMTP_URL` names, or, without one, as a file per message under
`$KILN_HOME/mail/`, its link also logged, so that `kiln dev` works with no mail server.

`smtp://user:password@host:587` upgrades to TLS with STARTTLS when the server offers it;
`smtps://host:465` speaks TLS from the start. smtplib blocks, so it runs in a worker thread,
bounded by `KILN_CONNECT_TIMEOUT`.
"""

from __future__ import annotations

import asyncio
import logging
import re
import smtplib
import ssl
import time
from dataclasses import dataclass
from email.message import EmailMessage
from email.utils import formatdate, make_msgid
from pathlib import Path
from urllib.parse import unquote, urlsplit

from kiln.errors import Unavailable
from kiln.settings import Settings

__all__ = ["Attachment", "Mail", "Mailer"]

_log = logging.getLogger("kiln.console.mail")


@dataclass(frozen=True)
class Attachment:
    filename: str
    content: bytes
    mime_type: str  # "application/pdf"


@dataclass(frozen=True, kw_only=True)
class Mail:
    to: str
    subject: str
    text: str  # the body, plain text
    kind: str  # a word for the file's name: "verify", "reset", "invite", "invoice"
    link: str | None = None  # the one link it carries (logged beside a file, for `kiln dev`)
    attachments: tuple[Attachment, ...] = ()


class Mailer:
    def __init__(self, settings: Settings) -> None:
        self.sender = settings.mail_from
        self.folder = settings.home / "mail"
        self.smtp_url = settings.smtp_url
        self.timeout_s = settings.connect_timeout_s

    async def send(self, mail: Mail) -> Path | None:
        """Send `mail`; the file it was written to when there is no SMTP server."""
        message = self._message(mail)
        if self.smtp_url is None:
            return await asyncio.to_thread(self._write, message, mail)
        try:
            await asyncio.to_thread(self._submit, message)
        except (OSError, smtplib.SMTPException) as exc:
            _log.error("could not send mail to %s through SMTP: %s", mail.to, exc)
            raise Unavailable(
                "the mail server did not take the message; try again", retry_after=30
            ) from None
        return None

    def _message(self, mail: Mail) -> EmailMessage:
        message = EmailMessage()
        message["From"] = self.sender
        message["To"] = mail.to
        message["Subject"] = mail.subject
        message["Date"] = formatdate(localtime=False)
        message["Message-ID"] = make_msgid(domain="kiln")
        message.set_content(mail.text)
        for attached in mail.attachments:
            main, _, sub = attached.mime_type.partition("/")
            message.add_attachment(
                attached.content, maintype=main, subtype=sub, filename=attached.filename
            )
        return message

    def _write(self, message: EmailMessage, mail: Mail) -> Path:
        self.folder.mkdir(mode=0o700, parents=True, exist_ok=True)
        stamp = time.strftime("%Y%m%dT%H%M%S", time.gmtime())
        address = re.sub(r"[^a-z0-9@._-]", "_", mail.to.lower())
        path = self.folder / f"{stamp}-{time.time_ns() % 10**9:09d}-{mail.kind}-{address}.eml"
        path.write_bytes(bytes(message))
        path.chmod(0o600)
        _log.info(
            "mail to %s (%s) written to %s%s", mail.to, mail.subject, path,
            f"; its link: {mail.link}" if mail.link else "",
        )  # fmt: skip
        return path

    def _submit(self, message: EmailMessage) -> None:
        assert self.smtp_url is not None
        url = urlsplit(self.smtp_url)
        host = url.hostname or "localhost"
        context = ssl.create_default_context()
        client: smtplib.SMTP
        if url.scheme == "smtps":
            client = smtplib.SMTP_SSL(
                host, url.port or 465, timeout=self.timeout_s, context=context
            )
        else:
            client = smtplib.SMTP(host, url.port or 587, timeout=self.timeout_s)
        with client:
            client.ehlo()
            if url.scheme == "smtp" and client.has_extn("starttls"):
                client.starttls(context=context)
                client.ehlo()
            if url.username:
                client.login(unquote(url.username), unquote(url.password or ""))
            client.send_message(message)
