"""Live-restore sessions: record, runner, cutover, control, application, cleanup, status."""
