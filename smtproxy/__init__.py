"""smtproxy: a TLS-terminating SMTP proxy for plaintext legacy MTAs."""

__version__ = "0.1.0"
