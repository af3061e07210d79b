"""A fission fleet on Ray: one host agent per node, stateless front ends routing to them.

``host_agent`` wraps one host's ``Service`` in a Ray actor pinned to its node; ``control`` is the
single named actor holding the fleet catalog (which host has which sandbox, in SQLite) and
watching membership (new nodes get an agent, dead ones lose their sandboxes); ``cluster_service``
and ``cluster_sandboxes`` are the Service API the adapters call, routed over the fleet;
``placement`` chooses hosts (pure). Nothing outside this package imports Ray, and only
``fission serve --cluster`` / ``fission cluster`` import this package.
"""
