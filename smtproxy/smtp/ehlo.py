"""The EHLO reply as an editable list of service extensions."""

from __future__ import annotations

import dataclasses

from smtproxy.smtp.replies import Reply


@dataclasses.dataclass
class EhloReply:
    """`greeting` is the first line; `capabilities` maps KEYWORD → parameters, in order."""

    greeting: str
    capabilities: dict[str, str] = dataclasses.field(default_factory=dict)

    @classmethod
    def parse(cls, reply: Reply) -> EhloReply:
        """Read a 250 EHLO reply.

        The keyword is everything before the first space, upper-cased, so a legacy
        `AUTH=LOGIN PLAIN` line stays its own keyword "AUTH=LOGIN".
        """
        if reply.code != 250:
            raise ValueError(f"an EHLO reply has code 250, not {reply.code}")
        ehlo = cls(reply.lines[0])
        for line in reply.lines[1:]:
            keyword, _, params = line.strip(" ").partition(" ")
            if keyword:
                ehlo.capabilities[keyword.upper()] = params.strip(" ")
        return ehlo

    def to_reply(self) -> Reply:
        lines = [f"{keyword} {params}" if params else keyword for keyword, params in self.capabilities.items()]
        return Reply(250, (self.greeting, *lines))

    def has(self, keyword: str) -> bool:
        return keyword.upper() in self.capabilities

    def remove(self, *keywords: str) -> None:
        for keyword in keywords:
            self.capabilities.pop(keyword.upper(), None)

    def set(self, keyword: str, params: str = "") -> None:
        """Add at the end, or replace in place."""
        self.capabilities[keyword.upper()] = params

    def keywords(self) -> list[str]:
        return list(self.capabilities)
