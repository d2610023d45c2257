"""dmrecover: instant recovery of a data volume from backup."""

__version__ = "0.1.0"

# Every dm device created by dmrecover carries this UUID prefix, so it can be found, owned and
# cleaned up, and other tools leave it alone.
DM_UUID_PREFIX = "DMRECOVER-"
# ... and a name "dmrecover-<session>-<layer>" (udev links it as /dev/dmrecover/<session>/<layer>).
DM_NAME_PREFIX = "dmrecover"
