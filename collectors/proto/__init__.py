"""Generated gRPC stubs for the kubelet PodResources v1 API (regenerate with scripts/gen-proto)."""
