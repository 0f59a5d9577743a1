"""Outbound path: plaintext from the legacy MTA, STARTTLS to remote MX hosts."""
