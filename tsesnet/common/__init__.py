"""What every driver shares: the strict YAML config loader, the Ray connection, safe names."""
