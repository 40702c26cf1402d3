"""Operator commands: one module per group; each command takes the argparse Namespace and returns an exit code."""
