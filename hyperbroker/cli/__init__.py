"""The `hyperbroker` command line: argument parsing in `main`, one module per command family."""
