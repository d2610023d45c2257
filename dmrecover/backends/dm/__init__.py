"""The device-mapper backend: dm-snapshot over a read-only FUSE origin and a sparse COW."""
