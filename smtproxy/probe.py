"""`smtproxy probe`: connect to a destination exactly as outbound delivery would, and print
what happened, like Postfix's posttls-finger: the route and the MX hosts, the policy and
where it came from, each failed attempt, the handshake in Postfix's wording, and the
server's EHLO reply after TLS.  Nothing is sent beyond EHLO, STARTTLS and QUIT.
"""

from __future__ import annotations

from smtproxy.app import StartupError, build_outbound_parts
from smtproxy.config import Config
from smtproxy.events import EventBus, HandshakeFacts
from smtproxy.outbound.connector import DeliveryFailure
from smtproxy.policy.levels import Level, Policy, PolicyDecision
from smtproxy.routing.router import RoutingError
from smtproxy.tls.wording import connection_line


def _show_handshake(facts: HandshakeFacts) -> None:
    where = f"{facts.peer_name}[{facts.peer_addr}]:{facts.peer_port}"
    if facts.ok:
        print(connection_line(facts))
    else:
        print(f"TLS failure with {where}: {facts.failure_type} ({facts.failure_reason})")


async def probe(config: Config, domain: str, level: str | None, sender: str) -> int:
    """0 when a connection meeting the policy was made, 1 otherwise."""
    bus = EventBus()
    bus.subscribe(HandshakeFacts, _show_handshake)
    try:
        parts = build_outbound_parts(config, bus)
    except StartupError as exc:
        print(f"smtproxy: {exc}")
        return 1
    try:
        destination = await parts.router.route(domain)
    except RoutingError as exc:
        print(f"routing {domain}: {exc.reply.code} {exc.reply.text}")
        return 1
    print(f"nexthop: {destination.nexthop}")
    for target in destination.targets:
        preference = "" if target.preference is None else f" (preference {target.preference})"
        print(f"  try {target.hostname}[{target.address}]:{target.port}{preference}")
    decision = parts.policies.decide(destination.nexthop)
    if level is not None:
        decision = PolicyDecision(Policy(Level(level)), "--level")
    print(f"policy: {decision.policy.level} (source: {decision.source})")
    certificate = parts.connector.client_tls.certificate_for(sender)
    try:
        remote = await parts.connector.connect(domain, destination, decision, certificate)
    except DeliveryFailure as exc:
        print(f"no acceptable connection: {exc.reply.code} {exc.reply.text}")
        return 1
    if remote.policy.dane is not None:
        print(f"DANE: {remote.target.hostname} authenticated by TLSA {', '.join(remote.policy.dane.policy_strings)}")
    elif remote.policy.sts is not None:
        sts = remote.policy.sts
        print(f"MTA-STS: {sts.domain} policy {sts.policy_id}, mode {sts.mode}, mx {', '.join(sts.mx)}: "
              f"level {remote.policy.level}")
    if remote.facts is None:
        print(f"plaintext connection to {remote.peer} (the level allows it)")
    print("\n".join(f"  {line}" for line in remote.ehlo.to_reply().lines))
    await remote.connection.quit(config.outbound.reply_timeout)
    return 0
