"""kvtier: semantic memory tiering for the KV caches of LLM inference servers."""

__version__ = "0.1.0"
