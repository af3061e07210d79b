"""Egress for sandboxes that may reach the network: the policy, the tunnel and the proxy."""
