"""The containerd Snapshots gRPC service for nydus images (and plain OCI layers)."""
