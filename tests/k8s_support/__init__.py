"""Offline rendering and validation of the Kubernetes manifests in k8s/ (for the tests)."""
