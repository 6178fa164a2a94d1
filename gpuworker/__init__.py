"""The engine side of lorafaas: one shared backbone per process, many LoRA adapters.

Workers talk NATS and S3 only; nothing here imports SQL code.
"""
