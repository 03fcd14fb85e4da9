"""One patch module per host library."""
