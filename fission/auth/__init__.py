"""API keys, per-key quotas and the audit log: who may use the service, how much, what they ran."""
