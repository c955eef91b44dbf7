"""Tools for tests, not for training runs: sync_guard.no_host_sync proves a step never waits on the device."""
