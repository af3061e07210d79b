"""The operator's web dashboard at ``/ui`` (see docs/dashboard.md)."""

from fission.server.dashboard.site import create_dashboard

__all__ = ["create_dashboard"]
