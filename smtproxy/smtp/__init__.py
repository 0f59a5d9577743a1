"""The sans-IO SMTP core: bytes in, commands/replies/decisions out; no sockets, no clock."""

from smtproxy.smtp.commands import Command, parse_bdat, parse_command, parse_mail_from, parse_rcpt_to
from smtproxy.smtp.data import ChunkReader, DataError, DataScan, DataScanner
from smtproxy.smtp.ehlo import EhloReply
from smtproxy.smtp.errors import PeerProtocolError
from smtproxy.smtp.lines import LINE_TOO_LONG, LineReader, LineTooLong
from smtproxy.smtp.replies import Reply, ReplyParser
from smtproxy.smtp.session import ServerSession, SessionPolicy, SmtpState, too_many_errors

__all__ = [
    "LINE_TOO_LONG",
    "ChunkReader",
    "Command",
    "DataError",
    "DataScan",
    "DataScanner",
    "EhloReply",
    "LineReader",
    "LineTooLong",
    "PeerProtocolError",
    "Reply",
    "ReplyParser",
    "ServerSession",
    "SessionPolicy",
    "SmtpState",
    "parse_bdat",
    "parse_command",
    "parse_mail_from",
    "parse_rcpt_to",
    "too_many_errors",
]
