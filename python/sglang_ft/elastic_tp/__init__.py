"""Model-runner changes for elastic TP: resharding weights in place after a regroup."""
