"""The pre-ranking service and the `gpl` command line."""
