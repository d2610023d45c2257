"""Ways of presenting a pseudo-volume at a mount point, each one folder behind one interface."""
