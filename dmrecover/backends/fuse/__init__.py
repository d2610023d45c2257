"""The portable backend: the pseudo-volume as a FUSE file, on loop, mounted."""
