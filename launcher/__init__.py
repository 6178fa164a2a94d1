"""Runs the platform: the `lorafaas` CLI, the local dev stack, process control, the demo and
trace loading. Not a contract: no service imports this package."""
