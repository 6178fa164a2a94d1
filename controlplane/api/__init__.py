"""The control plane HTTP API: the operator's admin routes and the tenant routes."""
