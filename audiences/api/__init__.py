"""The Knock-compatible HTTP API (`audiences serve`): members, users, checks, guides, broadcasts."""
