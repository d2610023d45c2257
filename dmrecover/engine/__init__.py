"""The live-restore engine: bitmap, overlay, fetcher, restorer and the pseudo-volume's block
logic. It knows no session, no backend and no CLI."""
