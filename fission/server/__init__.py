"""Network adapters over the core service: the HTTP API (REST, on a Unix socket or TCP)."""
