"""Where evaluations run: in-process here; as Kubernetes Jobs in the cluster."""
