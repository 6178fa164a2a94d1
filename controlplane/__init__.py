"""The system of record: tenants, keys, functions, invocations, the usage ledger and bills."""
