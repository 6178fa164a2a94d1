"""The deciding half: pure policies over a cluster view, and the thin loop that applies them.

``model`` holds the plain data the policies read and return. Policies are pure functions of
(view, demand, catalog, previous plan, config, seed): no I/O, no clock, no global state. The
same functions run live (the control plane's scheduler loop), in unit tests and inside the
cluster simulator (``benchmarks/cluster_sim``), which replaces only the I/O and the clock.
"""
