"""The public HTTP data plane: authenticate, check, publish to JetStream, answer."""
