"""Pods and shells (issue 28): a terminal on a pseudo-terminal of its own, what `kiln shell` and
a pod's terminal run inside a replica's sandbox."""
