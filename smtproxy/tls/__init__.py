"""TLS: memory-BIO engine, server contexts, handshake facts and Postfix's wording."""
