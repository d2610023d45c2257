"""OS plumbing shared by every layer: the command runner, block devices, loops, mounts,
processes and durable files. Imports nothing of dmrecover but errors and units."""
