"""Where outbound mail goes: the routes table (Postfix transport syntax) and MX lookups."""
