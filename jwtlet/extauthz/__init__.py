"""The Envoy ext_authz front: the decision, and its HTTP and gRPC faces."""
