"""Inbound path: internet senders -> TLS termination -> plaintext legacy MTA."""
