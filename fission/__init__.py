"""fission: run untrusted code inside throwaway microVMs."""

__version__ = "0.1.0"
__all__ = ["__version__"]
