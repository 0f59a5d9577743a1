"""Per-destination TLS policy: levels, the Postfix policy table, s/qmail tlsdestinations."""
