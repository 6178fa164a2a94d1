"""lorafaas: serverless LLM inference where every function is a LoRA adapter on a shared backbone.

This package holds what every service shares: settings, wire messages, the names of the
outside world, domain errors, S3 artifacts, the local dev stack and the CLI. It never
imports torch or SQLAlchemy at module level.
"""

__version__ = "0.1.0"
