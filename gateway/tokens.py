"""Exact prompt token counts in the gateway, from the backbone's own ``tokenizer.json``.

Loaded once per backbone from S3 (only that file, never the weights) with the light
``tokenizers`` library. When it cannot be loaded the gateway does not guess: it returns
``None`` and the worker, which tokenizes anyway, refuses an over-long prompt with a 400.
"""

from __future__ import annotations

import asyncio
import logging

from lorafaas.artifacts import ArtifactStore, parse_s3_uri

log = logging.getLogger(__name__)


class TokenCounter:
    def __init__(self, store: ArtifactStore) -> None:
        self.store = store
        self._tokenizers: dict[str, object | None] = {}
        self._locks: dict[str, asyncio.Lock] = {}

    async def count(self, backbone_name: str, backbone_uri: str, text: str) -> int | None:
        tokenizer = await self._tokenizer(backbone_name, backbone_uri)
        if tokenizer is None:
            return None
        return len(tokenizer.encode(text).ids)

    async def _tokenizer(self, name: str, uri: str):
        if name in self._tokenizers:
            return self._tokenizers[name]
        async with self._locks.setdefault(name, asyncio.Lock()):
            if name not in self._tokenizers:
                self._tokenizers[name] = await asyncio.to_thread(self._load, uri)
        return self._tokenizers[name]

    def _load(self, uri: str):
        from tokenizers import Tokenizer

        try:
            if uri.startswith("s3://"):
                bucket, prefix = parse_s3_uri(uri)
                response = self.store.client.get_object(bucket, f"{prefix}/tokenizer.json")
                try:
                    return Tokenizer.from_str(response.read().decode())
                finally:
                    response.close()
                    response.release_conn()
            return Tokenizer.from_file(f"{uri.rstrip('/')}/tokenizer.json")
        except Exception as e:  # no tokenizer.json (e.g. a slow tokenizer): the worker checks exactly
            log.warning("no gateway tokenizer for %s (%s); the worker checks the context length", uri, e)
            return None
