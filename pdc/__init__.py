"""pdc: a declarative compiler that prunes and distills large language models."""

__version__ = "0.1.0"
