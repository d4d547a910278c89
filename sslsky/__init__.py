"""sslsky: self-supervised representation learning for multi-band galaxy surveys."""

__version__ = "0.1.0"
