"""Ray clusters: the embedded local cluster and the cluster section of the run spec."""
