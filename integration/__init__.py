"""End-to-end tests, benchmarks and the demo, against real containerd, registry, runc and kernel."""
