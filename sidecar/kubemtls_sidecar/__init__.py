"""kubemtls sidecar: the per-pod mTLS proxy."""
