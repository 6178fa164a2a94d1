"""The test suite as a package: tests/controlplane and tests/gateway must not shadow the real packages."""
