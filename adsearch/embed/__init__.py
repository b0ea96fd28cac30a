"""Speech model to cache: extraction (`adsearch.embed.extract`, needs torch) and the reader (no torch)."""

from adsearch.embed.cache import POOLINGS, STATS, CacheError, EmbeddingCache, open_cache

__all__ = ["POOLINGS", "STATS", "CacheError", "EmbeddingCache", "open_cache"]
