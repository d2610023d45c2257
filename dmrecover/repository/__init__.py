"""The backup repository: store, manifests, backup, offline restore, verify."""
